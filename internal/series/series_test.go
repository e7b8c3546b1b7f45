package series

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestBuilderHalvesAndMerges(t *testing.T) {
	start := time.Unix(1000, 0)
	b := NewBuilder(start, 1, time.Second, 8)
	a, c := Key{Pid: 10, StackID: 1}, Key{Pid: 11, StackID: 7}
	for i := 0; i < 20; i++ {
		at := start.Add(time.Duration(i+1) * time.Second)
		if !b.Due(at) {
			continue
		}
		live := map[Key]int64{a: int64(100 * (i + 1))}
		alive := map[int]bool{10: true}
		procs := []ProcPoint{{Pid: 10, Comm: "x", RSS: int64(1000 + i), RssAnon: int64(500 + i)}}
		if i >= 10 { // pid 11 starts at point 10, with the same frames
			live[c] = 1
			alive[11] = true
		}
		b.Add(at, live, alive, procs, map[string]int64{"/cg": int64(i)})
	}
	// Ticks each second, points when due: 1..8 s, halved at 9 s to
	// 2,4,6,8 (2 s apart), then 9,11,13,15, halved at 17 s to 4,8,11,15
	// (4 s apart), then 17.
	if b.Interval() != 4*time.Second {
		t.Fatalf("interval %v, want 4s", b.Interval())
	}
	s := b.Finish(func(Key) []string { return []string{"leak", "main"} })
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	wantTimes := []int64{4000, 8000, 11000, 15000, 17000}
	if !reflect.DeepEqual(s.TimesMS, wantTimes) {
		t.Fatalf("times %v, want %v", s.TimesMS, wantTimes)
	}
	if len(s.Stacks) != 1 || !reflect.DeepEqual(s.Stacks[0].Pids, []int{10, 11}) {
		t.Fatalf("stacks %+v", s.Stacks)
	}
	// Kept points are the later of each pair, unaveraged: value 100*(i+1)
	// at second i+1, plus 1 from pid 11 from second 11 on.
	want := []int64{400, 800, 1101, 1501, 1701}
	if !reflect.DeepEqual(s.Stacks[0].Inuse, want) {
		t.Fatalf("inuse %v, want %v", s.Stacks[0].Inuse, want)
	}
	if got := s.Processes[0].RSS; got[0] != 1003 || got[4] != 1016 {
		t.Fatalf("RSS %v", got)
	}
	if got := s.Cgroups[0].Usage; got[0] != 3 || got[4] != 16 {
		t.Fatalf("cgroup usage %v", got)
	}
	if tot := s.TotalInuse(); tot[4] != 1701 {
		t.Fatalf("total %v", tot)
	}
}

func TestBuilderAbsentWhenNotRunning(t *testing.T) {
	start := time.Unix(0, 0)
	b := NewBuilder(start, 1, time.Second, 0)
	k := Key{Pid: 5, StackID: 2}
	b.Add(start.Add(time.Second), map[Key]int64{k: 10}, map[int]bool{5: true}, []ProcPoint{{Pid: 5, RSS: 1, RssAnon: 1}}, nil)
	b.Add(start.Add(2*time.Second), map[Key]int64{}, map[int]bool{5: true}, []ProcPoint{{Pid: 5, RSS: 1, RssAnon: 1}}, nil)
	b.Add(start.Add(3*time.Second), map[Key]int64{{6, 1}: 5}, map[int]bool{6: true}, []ProcPoint{{Pid: 6, RSS: 2, RssAnon: 2}}, nil) // 5 exited, 6 started
	b.Add(start.Add(4*time.Second), map[Key]int64{}, map[int]bool{}, nil, nil)                                                       // both gone
	s := b.Finish(func(k Key) []string { return []string{fmt.Sprint(k.Pid)} })
	if want := []int64{10, 0, Absent}; !reflect.DeepEqual(s.Stacks[0].Inuse, want) {
		t.Fatalf("inuse %v, want %v (the last point, with nothing running, dropped)", s.Stacks[0].Inuse, want)
	}
	if want := []int64{1, 1, Absent}; !reflect.DeepEqual(s.Processes[0].RSS, want) {
		t.Fatalf("RSS %v, want %v", s.Processes[0].RSS, want)
	}
	if len(s.TimesMS) != 3 {
		t.Fatalf("times %v", s.TimesMS)
	}
}

func TestSidecarRoundTripAndBadFiles(t *testing.T) {
	if got := SidecarPath("/x/heap.pb.gz"); got != "/x/heap.series.json.gz" {
		t.Fatal(got)
	}
	if got := SidecarPath("prof"); got != "prof.series.json.gz" {
		t.Fatal(got)
	}
	dir := t.TempDir()
	b := NewBuilder(time.Unix(5, 0).UTC(), 512, time.Second, 0)
	b.Add(time.Unix(6, 0), map[Key]int64{{1, 1}: 3}, map[int]bool{1: true}, nil, nil)
	s := b.Finish(func(Key) []string { return []string{"a"} })
	p := filepath.Join(dir, "s.series.json.gz")
	if err := WriteFile(p, s); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Stacks, s.Stacks) || got.SampleRate != 512 || !got.Start.Equal(s.Start) {
		t.Fatalf("round trip: %+v vs %+v", got, s)
	}
	if _, err := ReadFile(filepath.Join(dir, "none")); !errors.Is(err, ErrNoSeries) {
		t.Fatalf("missing file: %v", err)
	}
	os.WriteFile(p, []byte("not gzip"), 0o644)
	if _, err := ReadFile(p); err == nil {
		t.Fatal("garbage accepted")
	}
	s.Stacks[0].Inuse = append(s.Stacks[0].Inuse, 1)
	if err := WriteFile(p, s); err == nil {
		t.Fatal("inconsistent series written")
	}
}

// TestReadFileBounded: a sidecar whose arrays are longer than a series can
// have (a 40 MB run of zeros as times_ms, gzipped to ~40 KB; before, 253 KB
// of it took `memprof report` 32 s and 4.3 GiB) is refused with an error
// naming the array, without decoding it: the bytes allocated stay within a
// few times the file's decompressed size, not the 16x of decoding 20
// million numbers. So are too many stacks, and nesting too deep.
func TestReadFileBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("a resource-bomb test (hundreds of MiB parsed): in the root tier, not in the -short -race unit tier, where the race detector makes it 10-15x slower")
	}
	dir := t.TempDir()
	write := func(name string, parts ...[]byte) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		zw := gzip.NewWriter(f)
		for _, b := range parts {
			zw.Write(b)
		}
		zw.Close()
		f.Close()
		return p
	}
	zeros := bytes.Repeat([]byte("0,"), 20<<20)
	for _, c := range []struct {
		name  string
		parts [][]byte
		want  string
	}{
		{"times", [][]byte{[]byte(`{"version":1,"times_ms":[`), zeros, []byte(`0]}`)}, "times_ms"},
		{"inuse", [][]byte{[]byte(`{"version":1,"times_ms":[1],"stacks":[{"frames":["f"],"inuse_bytes":[`), zeros, []byte(`0]}]}`)}, "inuse_bytes"},
		{"stacks", [][]byte{[]byte(`{"version":1,"stacks":[`), bytes.Repeat([]byte("{},"), MaxStacks+1), []byte(`{}]}`)}, "stacks"},
		{"deep", [][]byte{[]byte(`{"version":1,"x":`), bytes.Repeat([]byte("["), 1000), bytes.Repeat([]byte("]"), 1000), []byte(`}`)}, "nested"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := write(c.name+".series.json.gz", c.parts...)
			var size int
			for _, b := range c.parts {
				size += len(b)
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := ReadFile(p)
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("%d bytes decompressed: %v after %v, %.1f MiB allocated", size, err, took.Round(time.Millisecond), float64(alloc)/(1<<20))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want one naming %q", err, c.want)
			}
			if alloc > uint64(4*size)+(16<<20) {
				t.Errorf("%.1f MiB allocated to refuse %d bytes, want at most 4x + 16 MiB", float64(alloc)/(1<<20), size)
			}
		})
	}
}
