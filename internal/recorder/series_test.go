package recorder

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/growth"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// TestSeriesOfACgroup records testdata/growth_demo.c through its cgroup for
// 4 s: the series has the cgroup's usage and the process's RSS at each
// point, the usage holds the process's RssAnon, and the leak's stack rises
// while the cache's does not.
func TestSeriesOfACgroup(t *testing.T) {
	testprog.RequireRoot(t)
	demo := testprog.Build(t, "growth_demo.c")
	dir := testCgroup(t, "series", 0)
	// The shell joins the cgroup, then runs the demo: every page it
	// touches is charged there.
	cmd := exec.Command("sh", "-c", fmt.Sprintf("echo $$ > %s/cgroup.procs && exec %s 6", dir, demo))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	time.Sleep(300 * time.Millisecond)
	// 64 KiB: the leak's growth over the 4 s window stands well above the
	// sampling noise (at 512 KiB the classifier's margin is ~9 sampled
	// blocks, and one run in several called the 2 s tail steady).
	s, err := Start(context.Background(), Options{Cgroups: []string{dir}, SampleRate: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rec := s.RecordSeries()
	time.Sleep(4 * time.Second)
	ser, err := rec.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if err := ser.Check(); err != nil {
		t.Fatal(err)
	}
	if len(ser.Cgroups) != 1 || ser.Cgroups[0].Path != dir || len(ser.Processes) != 1 {
		t.Fatalf("series has cgroups %+v and %d processes, want %s and the demo", ser.Cgroups, len(ser.Processes), dir)
	}
	u, p := ser.Cgroups[0].Usage, ser.Processes[0]
	checked := 0
	for i := range ser.TimesMS {
		if u[i] == series.Absent || p.RssAnon[i] == series.Absent {
			continue
		}
		checked++
		// The usage (read just after /proc, in the same point) holds the
		// process's anonymous memory; it may hold more (page cache,
		// kernel memory): tolerance 1 MiB below, 16 MiB above.
		if u[i] < p.RssAnon[i]-(1<<20) || u[i] > p.RSS[i]+(16<<20) {
			t.Errorf("at %d ms cgroup usage %d, process RSS %d RssAnon %d", ser.TimesMS[i], u[i], p.RSS[i], p.RssAnon[i])
		}
	}
	if checked < 10 {
		t.Fatalf("only %d points with both usage and RSS", checked)
	}
	t.Logf("%d points; usage %d -> %d, RssAnon %d -> %d; %.2f ms CPU per point", len(ser.TimesMS), u[0], u[len(u)-1], p.RssAnon[0], p.RssAnon[len(u)-1], ser.ReadMeanMS)
	trends := map[string]growth.Trend{}
	for _, st := range ser.Stacks {
		var ts, xs []float64
		for i, v := range st.Inuse {
			if v != series.Absent {
				ts, xs = append(ts, float64(ser.TimesMS[i])/1000), append(xs, float64(v))
			}
		}
		trends[strings.Fields(st.Frames[0])[0]] = growth.Classify(growth.Input{Times: ts, Live: xs, Quantum: float64(ser.SampleRate)}).Trend
	}
	if trends["leak_grow"] != growth.Growing {
		t.Errorf("leak_grow: %v, want growing (trends %v)", trends["leak_grow"], trends)
	}
	if tr, ok := trends["cache_fill"]; ok && tr == growth.Growing {
		t.Errorf("cache_fill growing after its fill")
	}
}

// A read that leaves a process out (the series' reads of the live targets
// while another one is being frozen at its exit) must not forget the copied
// stacks of that process's live blocks; a read of the process does forget
// its blocks that are gone.
func TestResolveKeepsProcessesNotRead(t *testing.T) {
	d := newDwarfStacks(nil, nil)
	d.seqs[1] = seqInfo{id: stackFlag, pid: 10, gen: 0}
	d.seqs[2] = seqInfo{id: stackFlag + 1, pid: 20, gen: 0}
	d.seqs[3] = seqInfo{id: stackFlag + 1, pid: 20, gen: 0}
	d.gen = 1
	only := func(pid uint32) func(uint32) bool { return func(p uint32) bool { return p == pid } }
	// Pid 10 read: its block (seq 1) is live; pid 20 is not read.
	snap := &heap.Snapshot{Stacks: map[uint64][]uint64{}, Buckets: []heap.Bucket{{Key: heap.Key{Pid: 10, StackID: stackFlag | 1, Size: 8}, InuseCount: 1}}}
	d.resolve(snap, only(10))
	if _, ok := d.seqs[2]; !ok {
		t.Fatal("a read of pid 10 forgot the live blocks of pid 20")
	}
	// Pid 20 read: seq 2 live, seq 3 gone.
	snap = &heap.Snapshot{Stacks: map[uint64][]uint64{}, Buckets: []heap.Bucket{{Key: heap.Key{Pid: 20, StackID: stackFlag | 2, Size: 8}, InuseCount: 1}}}
	d.resolve(snap, only(20))
	if _, ok := d.seqs[3]; ok {
		t.Fatal("seq 3 of pid 20, no longer live, kept")
	}
	if _, ok := d.seqs[2]; !ok {
		t.Fatal("seq 2 of pid 20, live, forgotten")
	}
	if snap.Buckets[0].StackID != stackFlag+1 {
		t.Fatalf("seq 2 resolved to %#x, want %#x", snap.Buckets[0].StackID, stackFlag+1)
	}
}

// TestSeriesWithCopiedStacks: a command recorded with .eh_frame unwinding
// (stacks copied and unwound in memprof) while the series reads the maps
// four times a second, through the command's exit: the final profile keeps
// the stacks of the live blocks (the series' reads, which leave out the
// exiting process, once made them all "[stack unavailable]"), and the
// series has the leak under its unwound stack.
func TestSeriesWithCopiedStacks(t *testing.T) {
	testprog.RequireRoot(t)
	demo := testprog.Build(t, "growth_demo.c")
	s, err := Start(context.Background(), Options{Command: []string{demo, "3"}, StackMode: StackDwarf})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rec := s.RecordSeries()
	s.Wait(context.Background(), 30*time.Second)
	p, err := s.Profile()
	if err != nil {
		t.Fatal(err)
	}
	ser, err := rec.Stop()
	if err != nil {
		t.Fatal(err)
	}
	var total, unknown, leak int64
	for _, smp := range p.Samples {
		_, b := pprofout.Unsample(smp.InuseCount, smp.Size, p.SampleRate)
		total += b
		f := pprofout.Frames(smp.Stack)
		switch {
		case f[0] == "[stack unavailable]":
			unknown += b
		case strings.HasPrefix(f[0], "leak_grow "):
			leak += b
		}
	}
	if total == 0 || unknown > total/10 || leak == 0 {
		t.Fatalf("live %d bytes, %d without a stack, %d under leak_grow: stacks lost", total, unknown, leak)
	}
	found := false
	for _, st := range ser.Stacks {
		if strings.HasPrefix(st.Frames[0], "leak_grow ") && len(st.Frames) > 2 {
			found = true
		}
	}
	if !found {
		t.Fatalf("no unwound leak_grow stack in the series: %v", ser.Stacks)
	}
	t.Logf("live %.1f MiB, %.1f MiB without a stack, leak_grow %.1f MiB; %d points", float64(total)/(1<<20), float64(unknown)/(1<<20), float64(leak)/(1<<20), len(ser.TimesMS))
}
