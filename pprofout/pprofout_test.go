package pprofout

import (
	"bytes"
	"context"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"
)

const rate512K = 512 * 1024

// fixture is a process with a main executable and libc, an inlined frame and
// an address-only location.
type fixture struct {
	app, libc, unused      *Mapping
	l1, l2, l3, l4, l5     *Location
	start                  time.Time
	stackA, stackB, stackC []*Location
}

func newFixture() *fixture {
	f := &fixture{}
	f.app = &Mapping{Start: 0x400000, Limit: 0x500000, Offset: 0x1000, File: "/usr/bin/app",
		BuildID: "aabbccdd", HasFunctions: true, HasFilenames: true, HasLineNumbers: true, HasInlineFrames: true}
	f.libc = &Mapping{Start: 0x7f0000000000, Limit: 0x7f0000100000, Offset: 0x28000,
		File: "/usr/lib/x86_64-linux-gnu/libc.so.6", BuildID: "11223344", HasFunctions: true}
	f.unused = &Mapping{Start: 0x7f0000200000, Limit: 0x7f0000300000, File: "/usr/lib/libunused.so"}
	f.l1 = &Location{Addr: 0x401010, Mapping: f.app, Lines: []Line{
		{Function: "inlinedHelper", SystemName: "_Z13inlinedHelperv", File: "app.c", Line: 10},
		{Function: "makeBuffer", File: "app.c", Line: 20},
	}}
	f.l2 = &Location{Addr: 0x401100, Mapping: f.app, Lines: []Line{{Function: "main", File: "app.c", Line: 30}}}
	f.l3 = &Location{Addr: 0x7f0000001000, Mapping: f.libc, Lines: []Line{{Function: "__libc_start_call_main"}}}
	f.l4 = &Location{Addr: 0x402000, Mapping: f.app, Lines: []Line{{Function: "cacheInsert", File: "app.c", Line: 40}}}
	f.l5 = &Location{Addr: 0xdead0000}
	f.stackA = []*Location{f.l1, f.l2, f.l3}
	f.stackB = []*Location{f.l4, f.l2, f.l3}
	f.stackC = []*Location{f.l5, f.l2}
	f.start = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	return f
}

// profile returns six samples; the fourth is identical to the first in
// stack, labels and size and must be merged with it.
func (f *fixture) profile() *Profile {
	return &Profile{
		SampleRate: rate512K,
		Start:      f.start,
		Duration:   30 * time.Second,
		Comments:   []string{"hello", MetaComment("missed_frees", "7")},
		Samples: []Sample{
			{Stack: f.stackA, Size: 1024, AllocCount: 3, InuseCount: 2, Labels: map[string]string{"pod": "a"}},
			{Stack: f.stackB, Size: 65536, AllocCount: 10, InuseCount: 10, Labels: map[string]string{"pod": "a"},
				NumLabels: map[string]int64{"tid": 42}},
			{Stack: f.stackC, Size: 4096, AllocCount: 1},
			{Stack: f.stackA, Size: 1024, AllocCount: 2, InuseCount: 1, Labels: map[string]string{"pod": "a"}},
			{Stack: f.stackA, Size: 2048, AllocCount: 1, InuseCount: 1, Labels: map[string]string{"pod": "a"}},
			{Stack: f.stackA, Size: 1024, AllocCount: 4, InuseCount: 4, Labels: map[string]string{"pod": "b"}},
		},
	}
}

func TestUnsampleKnownValues(t *testing.T) {
	// scale = 1/(1-exp(-1024/524288)) = 512.50016276...
	objects, bytes := Unsample(3, 1024, rate512K)
	if objects != 1538 {
		t.Errorf("Unsample(3, 1024, 512KiB) objects = %d, want 1538 (3*512.50016 rounded)", objects)
	}
	if math.Abs(float64(bytes)-1574400.5) > 1 {
		t.Errorf("Unsample(3, 1024, 512KiB) bytes = %d, want 1574400.5 +-1", bytes)
	}
	// Large blocks are almost always sampled: scale = 1.1565 for 1 MiB.
	objects, bytes = Unsample(3, 1<<20, rate512K)
	if objects != 3 || math.Abs(float64(bytes)-3638089.93) > 1 {
		t.Errorf("Unsample(3, 1MiB, 512KiB) = %d, %d; want 3, 3638090 +-1", objects, bytes)
	}
	for _, rate := range []uint64{0, 1} {
		objects, bytes = Unsample(7, 100, rate)
		if objects != 7 || bytes != 700 {
			t.Errorf("Unsample(7, 100, %d) = %d, %d; want exact 7, 700", rate, objects, bytes)
		}
	}
	if o, b := Unsample(0, 1024, rate512K); o != 0 || b != 0 {
		t.Errorf("Unsample(0, 1024, 512KiB) = %d, %d; want 0, 0", o, b)
	}
	if o, b := Unsample(5, 0, rate512K); o != 5 || b != 0 {
		t.Errorf("Unsample(5, 0, 512KiB) = %d, %d; want 5, 0", o, b)
	}
}

// TestUnsampleRecoversTruth simulates Poisson byte sampling (exponential gaps
// of mean rate) over known allocations and checks that Unsample of the
// sampled count recovers the true totals within 5% (about 4 standard
// deviations for these sample counts).
func TestUnsampleRecoversTruth(t *testing.T) {
	const rate = 64 * 1024
	rng := rand.New(rand.NewPCG(1, 2))
	for _, size := range []uint64{256, 4096, 48 * 1024, 1 << 20} {
		const n = 100000
		next := rng.ExpFloat64() * rate
		var sampled uint64
		for i := 0; i < n; i++ {
			next -= float64(size)
			if next <= 0 {
				sampled++
				for next <= 0 {
					next += rng.ExpFloat64() * rate
				}
			}
		}
		objects, bytes := Unsample(sampled, size, rate)
		if rel := math.Abs(float64(objects)-n) / n; rel > 0.05 {
			t.Errorf("size %d: %d sampled, unsampled objects %d, true %d (error %.1f%% > 5%%)", size, sampled, objects, n, 100*rel)
		}
		trueBytes := float64(n * size)
		if rel := math.Abs(float64(bytes)-trueBytes) / trueBytes; rel > 0.05 {
			t.Errorf("size %d: unsampled bytes %d, true %.0f (error %.1f%% > 5%%)", size, bytes, trueBytes, 100*rel)
		}
	}
}

func TestBuildRoundTrip(t *testing.T) {
	f := newFixture()
	var buf bytes.Buffer
	if err := Write(&buf, f.profile()); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if b := buf.Bytes(); len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("Write output is not gzipped (first bytes %x)", b[:min(len(b), 2)])
	}
	p, err := profile.Parse(&buf)
	if err != nil {
		t.Fatalf("profile.Parse of Write output: %v", err)
	}
	if err := p.CheckValid(); err != nil {
		t.Fatalf("CheckValid after round trip: %v", err)
	}

	var types []string
	for _, st := range p.SampleType {
		types = append(types, st.Type+"/"+st.Unit)
	}
	wantTypes := []string{"alloc_objects/count", "alloc_space/bytes", "inuse_objects/count", "inuse_space/bytes"}
	if !reflect.DeepEqual(types, wantTypes) {
		t.Errorf("sample types = %v, want %v", types, wantTypes)
	}
	if p.DefaultSampleType != "inuse_space" {
		t.Errorf("DefaultSampleType = %q, want inuse_space", p.DefaultSampleType)
	}
	if p.PeriodType == nil || p.PeriodType.Type != "space" || p.PeriodType.Unit != "bytes" {
		t.Errorf("PeriodType = %+v, want space/bytes", p.PeriodType)
	}
	if p.Period != rate512K {
		t.Errorf("Period = %d, want %d", p.Period, rate512K)
	}
	if p.TimeNanos != f.start.UnixNano() || p.DurationNanos != int64(30*time.Second) {
		t.Errorf("TimeNanos, DurationNanos = %d, %d; want %d, %d", p.TimeNanos, p.DurationNanos, f.start.UnixNano(), int64(30*time.Second))
	}
	if len(p.Comments) != 2 || p.Comments[0] != "hello" {
		t.Errorf("Comments = %q, want [hello, memprof: missed_frees=7]", p.Comments)
	}
	if v, ok := CommentValue(p, "missed_frees"); !ok || v != "7" {
		t.Errorf("CommentValue(missed_frees) = %q, %v; want 7, true", v, ok)
	}
	if _, ok := CommentValue(p, "missed"); ok {
		t.Errorf("CommentValue(missed) found a value; want none (key is only a prefix of missed_frees)")
	}

	// Mappings: main executable first, IDs from 1, fields kept.
	if len(p.Mapping) != 2 {
		t.Fatalf("%d mappings, want 2", len(p.Mapping))
	}
	m := p.Mapping[0]
	if m.ID != 1 || m.File != "/usr/bin/app" || m.BuildID != "aabbccdd" || m.Start != 0x400000 || m.Limit != 0x500000 ||
		m.Offset != 0x1000 || !m.HasFunctions || !m.HasFilenames || !m.HasLineNumbers || !m.HasInlineFrames {
		t.Errorf("mapping 0 = %+v, want app with ID 1, build ID, offset and all Has* flags", m)
	}
	m = p.Mapping[1]
	if m.ID != 2 || !strings.HasSuffix(m.File, "libc.so.6") || m.BuildID != "11223344" || m.Offset != 0x28000 ||
		!m.HasFunctions || m.HasFilenames || m.HasLineNumbers {
		t.Errorf("mapping 1 = %+v, want libc with ID 2, build ID, offset, HasFunctions only", m)
	}

	// Locations: deduplicated by pointer (5 distinct), inlined lines
	// innermost first, address-only location without mapping.
	if len(p.Location) != 5 {
		t.Errorf("%d locations, want 5", len(p.Location))
	}
	// Functions: inlinedHelper, makeBuffer, main, __libc_start_call_main, cacheInsert.
	if len(p.Function) != 5 {
		t.Errorf("%d functions, want 5", len(p.Function))
	}

	type want struct {
		leaf        string
		size        int64
		pod         string
		alloc, live uint64
	}
	wants := []want{
		{"inlinedHelper", 1024, "a", 5, 3}, // merged from two samples
		{"cacheInsert", 65536, "a", 10, 10},
		{"", 4096, "", 1, 0},
		{"inlinedHelper", 2048, "a", 1, 1},
		{"inlinedHelper", 1024, "b", 4, 4},
	}
	if len(p.Sample) != len(wants) {
		t.Fatalf("%d samples, want %d (two identical samples merged)", len(p.Sample), len(wants))
	}
	for i, w := range wants {
		s := p.Sample[i]
		ao, ab := Unsample(w.alloc, uint64(w.size), rate512K)
		io, ib := Unsample(w.live, uint64(w.size), rate512K)
		if got, wantV := s.Value, []int64{ao, ab, io, ib}; !reflect.DeepEqual(got, wantV) {
			t.Errorf("sample %d values = %v, want %v", i, got, wantV)
		}
		if got := s.NumLabel["bytes"]; len(got) != 1 || got[0] != w.size {
			t.Errorf("sample %d bytes label = %v, want [%d]", i, got, w.size)
		}
		if got := s.NumUnit["bytes"]; len(got) != 1 || got[0] != "bytes" {
			t.Errorf("sample %d bytes unit = %v, want [bytes]", i, got)
		}
		if w.pod == "" {
			if len(s.Label) != 0 {
				t.Errorf("sample %d labels = %v, want none", i, s.Label)
			}
		} else if got := s.Label["pod"]; len(got) != 1 || got[0] != w.pod {
			t.Errorf("sample %d pod label = %v, want [%s]", i, got, w.pod)
		}
		leaf := s.Location[0]
		if w.leaf == "" {
			if leaf.Mapping != nil || len(leaf.Line) != 0 || leaf.Address != 0xdead0000 {
				t.Errorf("sample %d leaf = %+v, want address-only 0xdead0000 without mapping", i, leaf)
			}
		} else if leaf.Line[0].Function.Name != w.leaf {
			t.Errorf("sample %d leaf function = %q, want %q", i, leaf.Line[0].Function.Name, w.leaf)
		}
	}
	// First sample's values against the hand-computed formula:
	// 5 allocations of 1 KiB at 512 KiB: 5*512.50016 = 2562.5008 -> 2563.
	if got := p.Sample[0].Value[0]; got != 2563 {
		t.Errorf("merged sample alloc_objects = %d, want 2563", got)
	}
	if got := p.Sample[1].NumLabel["tid"]; len(got) != 1 || got[0] != 42 {
		t.Errorf("sample 1 tid label = %v, want [42]", got)
	}

	// The inlined location: innermost first, same Location shared by the
	// samples of stack A, function names and system names kept.
	loc := p.Sample[0].Location[0]
	if len(loc.Line) != 2 || loc.Line[0].Function.Name != "inlinedHelper" || loc.Line[0].Line != 10 ||
		loc.Line[0].Function.SystemName != "_Z13inlinedHelperv" || loc.Line[0].Function.Filename != "app.c" ||
		loc.Line[1].Function.Name != "makeBuffer" || loc.Line[1].Line != 20 {
		t.Errorf("inlined location lines = %+v, want inlinedHelper app.c:10 then makeBuffer app.c:20", loc.Line)
	}
	if loc.Address != 0x401010 || loc.Mapping == nil || loc.Mapping.ID != 1 {
		t.Errorf("inlined location = %+v, want address 0x401010 in mapping 1", loc)
	}
	if p.Sample[3].Location[0] != loc || p.Sample[4].Location[0] != loc {
		t.Errorf("stack A samples do not share their leaf location after round trip")
	}
}

func TestBuildMappingOrder(t *testing.T) {
	f := newFixture()
	// The first sample's only frame is in libc; the main executable must
	// still be the first mapping.
	p := &Profile{SampleRate: 1, Samples: []Sample{
		{Stack: []*Location{f.l3}, Size: 8, AllocCount: 1},
		{Stack: []*Location{f.l4}, Size: 8, AllocCount: 1},
	}}
	pp, err := Build(p)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if len(pp.Mapping) != 2 || pp.Mapping[0].File != "/usr/bin/app" || pp.Mapping[0].ID != 1 {
		t.Errorf("mappings without explicit order = %v, want /usr/bin/app first with ID 1", pp.Mapping)
	}

	// Explicit order, including a mapping no sample uses.
	p.Mappings = []*Mapping{f.app, f.unused, f.libc}
	pp, err = Build(p)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	var files []string
	for i, m := range pp.Mapping {
		files = append(files, m.File)
		if m.ID != uint64(i+1) {
			t.Errorf("mapping %d has ID %d, want %d", i, m.ID, i+1)
		}
	}
	want := []string{"/usr/bin/app", "/usr/lib/libunused.so", "/usr/lib/x86_64-linux-gnu/libc.so.6"}
	if !reflect.DeepEqual(files, want) {
		t.Errorf("mappings with explicit order = %v, want %v", files, want)
	}
	if pp.Sample[0].Location[0].Mapping != pp.Mapping[2] {
		t.Errorf("libc location points to mapping %v, want %v", pp.Sample[0].Location[0].Mapping, pp.Mapping[2])
	}
}

func TestBuildErrors(t *testing.T) {
	if _, err := Build(nil); err == nil {
		t.Errorf("Build(nil) succeeded, want an error")
	}
	_, err := Build(&Profile{SampleRate: 1, Samples: []Sample{{Stack: []*Location{nil}, Size: 1, AllocCount: 1}}})
	if err == nil || !strings.Contains(err.Error(), "nil location") {
		t.Errorf("Build with nil location: error %v, want one naming the nil location", err)
	}
	// An empty profile is valid.
	pp, err := Build(&Profile{SampleRate: rate512K})
	if err != nil || len(pp.Sample) != 0 {
		t.Errorf("Build of empty profile = %v, %v; want an empty valid profile", pp, err)
	}
}

func TestWriteFile(t *testing.T) {
	f := newFixture()
	dir := t.TempDir()
	path := filepath.Join(dir, "heap.pb.gz")
	if err := WriteFile(path, f.profile()); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	p, err := ReadFile(path)
	if err != nil {
		t.Fatalf("ReadFile of written profile: %v", err)
	}
	if len(p.Sample) != 5 || p.Period != rate512K {
		t.Errorf("read back %d samples, period %d; want 5, %d", len(p.Sample), p.Period, rate512K)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatalf("stat written profile: %v", err)
	}
	if st.Mode().Perm() != 0o644 {
		t.Errorf("profile mode = %v, want 0644", st.Mode().Perm())
	}
	assertDir(t, dir, []string{"heap.pb.gz"})

	// A failed build leaves the existing file unchanged and no temp file.
	before, _ := os.ReadFile(path)
	bad := &Profile{Samples: []Sample{{Stack: []*Location{nil}, AllocCount: 1}}}
	if err := WriteFile(path, bad); err == nil {
		t.Errorf("WriteFile of invalid profile succeeded, want an error")
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Errorf("failed WriteFile changed the existing file")
	}
	assertDir(t, dir, []string{"heap.pb.gz"})

	// A path whose directory is a regular file cannot be written (tests run
	// as root, so a read-only directory would not fail).
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, []byte("x"), 0o644); err != nil {
		t.Fatalf("create regular file: %v", err)
	}
	target := filepath.Join(regular, "heap.pb.gz")
	err = WriteFile(target, f.profile())
	if err == nil || !strings.Contains(err.Error(), target) {
		t.Errorf("WriteFile under a regular file: error %v, want one naming %s", err, target)
	}
	assertDir(t, dir, []string{"heap.pb.gz", "regular"})
}

func assertDir(t *testing.T, dir string, want []string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("read dir %s: %v", dir, err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("directory holds %v, want exactly %v", got, want)
	}
}

func TestReadFileErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.txt")
	if err := os.WriteFile(garbage, []byte("hello, this is certainly not a profile\n\x00\x01\x02"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := ReadFile(garbage)
	if err == nil || !strings.Contains(err.Error(), "not a pprof profile") || !strings.Contains(err.Error(), garbage) {
		t.Errorf("ReadFile(garbage) error = %v, want one saying %s is not a pprof profile", err, garbage)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(empty); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("ReadFile(empty) error = %v, want one saying the file is empty", err)
	}
	gz := filepath.Join(dir, "bad.gz")
	if err := os.WriteFile(gz, []byte{0x1f, 0x8b, 0, 1, 2, 3}, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(gz); err == nil || !strings.Contains(err.Error(), "not a pprof profile") {
		t.Errorf("ReadFile(corrupt gzip) error = %v, want one saying it is not a pprof profile", err)
	}
	missing := filepath.Join(dir, "missing")
	if _, err := ReadFile(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("ReadFile(missing) error = %v, want one naming %s", err, missing)
	}
}

// exactProfile has exact counts (rate 1) with known totals per stack:
// inuse: stack A 4 MiB (two sizes, two label sets), stack B 2 MiB,
// address-only stack C 1 MiB; alloc: stack D 8 MiB with nothing in use.
func exactProfile(f *fixture) *Profile {
	stackD := []*Location{{Addr: 0x403000, Mapping: f.app, Lines: []Line{{Function: "transientAlloc", File: "app.c", Line: 50}}}, f.l2}
	return &Profile{
		SampleRate: 1,
		Samples: []Sample{
			{Stack: f.stackB, Size: 1 << 20, AllocCount: 2, InuseCount: 2},
			{Stack: f.stackA, Size: 1 << 19, AllocCount: 2, InuseCount: 2, Labels: map[string]string{"pod": "a"}},
			{Stack: f.stackC, Size: 1 << 10, AllocCount: 1024, InuseCount: 1024},
			{Stack: f.stackA, Size: 3 << 20, AllocCount: 1, InuseCount: 1, Labels: map[string]string{"pod": "b"}},
			{Stack: stackD, Size: 1 << 20, AllocCount: 8},
		},
	}
}

func TestTop(t *testing.T) {
	f := newFixture()
	pp, err := Build(exactProfile(f))
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	rows, err := Top(pp, "inuse_space", 10)
	if err != nil {
		t.Fatalf("Top: %v", err)
	}
	want := []StackRow{
		{Value: 4 << 20, Objects: 3, Percent: 400.0 / 7,
			Frames: []string{"inlinedHelper app.c:10", "makeBuffer app.c:20", "main app.c:30", "__libc_start_call_main"}},
		{Value: 2 << 20, Objects: 2, Percent: 200.0 / 7,
			Frames: []string{"cacheInsert app.c:40", "main app.c:30", "__libc_start_call_main"}},
		{Value: 1 << 20, Objects: 1024, Percent: 100.0 / 7, Frames: []string{"0xdead0000", "main app.c:30"}},
	}
	if len(rows) != len(want) {
		t.Fatalf("Top(inuse_space) = %d rows %+v, want %d (zero stacks omitted)", len(rows), rows, len(want))
	}
	for i := range want {
		g, w := rows[i], want[i]
		if g.Value != w.Value || g.Objects != w.Objects || math.Abs(g.Percent-w.Percent) > 1e-9 || !reflect.DeepEqual(g.Frames, w.Frames) {
			t.Errorf("row %d = %+v, want %+v", i, g, w)
		}
	}

	rows, err = Top(pp, "alloc_space", 1)
	if err != nil {
		t.Fatalf("Top(alloc_space): %v", err)
	}
	if len(rows) != 1 || rows[0].Value != 8<<20 || rows[0].Objects != 8 || rows[0].Frames[0] != "transientAlloc app.c:50" ||
		math.Abs(rows[0].Percent-800.0/15) > 1e-9 {
		t.Errorf("Top(alloc_space, 1) = %+v, want one row transientAlloc 8 MiB, 8 objects, 53.33%%", rows)
	}
	rows, err = Top(pp, "inuse_objects", 0)
	if err != nil {
		t.Fatalf("Top(inuse_objects): %v", err)
	}
	if len(rows) != 3 || rows[0].Value != 1024 || rows[0].Objects != 1024 || rows[0].Frames[0] != "0xdead0000" {
		t.Errorf("Top(inuse_objects, 0) = %+v, want 3 rows led by the address-only stack with 1024", rows)
	}
	if _, err := Top(pp, "cpu", 5); err == nil || !strings.Contains(err.Error(), "cpu") {
		t.Errorf("Top(cpu) error = %v, want one naming the missing sample type", err)
	}

	// FormatTop: order, human units, percent, objects, frame truncation.
	rows, _ = Top(pp, "inuse_space", 10)
	var out bytes.Buffer
	if err := FormatTop(&out, rows, "inuse_space", 2); err != nil {
		t.Fatalf("FormatTop: %v", err)
	}
	text := out.String()
	i4, i2, i1 := strings.Index(text, "4.0 MiB"), strings.Index(text, "2.0 MiB"), strings.Index(text, "1.0 MiB")
	if i4 < 0 || i2 < 0 || i1 < 0 || i4 >= i2 || i2 >= i1 {
		t.Errorf("FormatTop output lacks 4.0, 2.0, 1.0 MiB in that order:\n%s", text)
	}
	for _, s := range []string{"57.14%", "28.57%", "14.29%", "1024", "inlinedHelper app.c:10", "makeBuffer app.c:20",
		"0xdead0000", "... 2 more frames"} {
		if !strings.Contains(text, s) {
			t.Errorf("FormatTop output lacks %q:\n%s", s, text)
		}
	}
	if strings.Contains(text, "__libc_start_call_main") {
		t.Errorf("FormatTop with maxFrames 2 printed a third frame:\n%s", text)
	}
	lines := strings.Split(text, "\n")
	if len(lines) < 3 || !strings.HasPrefix(strings.TrimSpace(lines[1]), "1 ") || !strings.HasPrefix(lines[2], "        inlinedHelper") {
		t.Errorf("FormatTop row layout unexpected (want rank line then indented frames):\n%s", text)
	}
}

func TestHumanBytes(t *testing.T) {
	for _, c := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"}, {1<<20 - 1, "1.0 MiB"},
		{3 << 20, "3.0 MiB"}, {5 << 30, "5.0 GiB"}, {-2048, "-2.0 KiB"},
		{math.MaxInt64, "8.0 EiB"}, {math.MinInt64, "-8.0 EiB"},
	} {
		if got := HumanBytes(c.n); got != c.want {
			t.Errorf("HumanBytes(%d) = %q, want %q", c.n, got, c.want)
		}
	}
}

// goTool returns the go command of the toolchain running the tests.
func goTool(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	p := "/usr/local/go/bin/go"
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("cannot find the go command in PATH or at %s: %v", p, err)
	}
	return p
}

// pprofEnv runs cmd outside the module (so a go.mod being edited cannot
// affect it) with pprof's scratch and binary search paths in temp dirs.
func pprofEnv(t *testing.T, cmd *exec.Cmd) {
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "PPROF_TMPDIR="+t.TempDir(), "PPROF_BINARY_PATH="+t.TempDir())
}

// TestGoToolPprof checks that the real pprof of the Go toolchain reads a
// written profile and reports the expected flat values per function. On a
// machine with a cold build cache, `go tool pprof` is compiled first (about
// 20 s on 2 cores); it is skipped with -short.
func TestGoToolPprof(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping go tool pprof in -short mode (it may need to be compiled)")
	}
	f := newFixture()
	path := filepath.Join(t.TempDir(), "heap.pb.gz")
	if err := WriteFile(path, exactProfile(f)); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(t), "tool", "pprof", "-top", "-sample_index=inuse_space", path)
	pprofEnv(t, cmd)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go tool pprof -top failed: %v\n%s", err, out)
	}
	text := string(out)
	// Flat and cumulative values by function: the leaf is the innermost
	// inlined function; pprof names the address-only location <unknown>.
	for _, w := range []struct{ fn, flat, cum string }{
		{"inlinedHelper", "4MB", "4MB"}, {"cacheInsert", "2MB", "2MB"}, {"<unknown>", "1MB", "1MB"},
		{"makeBuffer", "0", "4MB"}, {"main", "0", "7MB"}, {"__libc_start_call_main", "0", "6MB"},
	} {
		found := false
		for _, line := range strings.Split(text, "\n") {
			fields := strings.Fields(line)
			if len(fields) >= 6 && fields[0] == w.flat && fields[3] == w.cum && fields[5] == w.fn {
				found = true
			}
		}
		if !found {
			t.Errorf("go tool pprof -top output has no line with flat %s, cum %s for %s:\n%s", w.flat, w.cum, w.fn, text)
		}
	}
	if !strings.Contains(text, "7MB total") {
		t.Errorf("go tool pprof -top output lacks the 7MB total:\n%s", text)
	}
	if strings.Contains(text, "transientAlloc") {
		t.Errorf("go tool pprof -top shows transientAlloc, which has no in-use space:\n%s", text)
	}

	// The sampled fixture: flat in-use bytes per leaf are the sums of the
	// unsampled (stack, size) buckets.
	if err := WriteFile(path, f.profile()); err != nil {
		t.Fatalf("WriteFile: %v", err)
	}
	cmd = exec.CommandContext(ctx, goTool(t), "tool", "pprof", "-top", "-unit=B", "-sample_index=inuse_space", path)
	pprofEnv(t, cmd)
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go tool pprof -top -unit=B failed: %v\n%s", err, out)
	}
	text = string(out)
	_, a1 := Unsample(3, 1024, rate512K)
	_, a2 := Unsample(1, 2048, rate512K)
	_, a3 := Unsample(4, 1024, rate512K)
	_, b := Unsample(10, 65536, rate512K)
	for _, w := range []struct {
		fn   string
		flat int64
	}{{"inlinedHelper", a1 + a2 + a3}, {"cacheInsert", b}} {
		want := strconv.FormatInt(w.flat, 10) + "B"
		found := false
		for _, line := range strings.Split(text, "\n") {
			fields := strings.Fields(line)
			if len(fields) >= 6 && fields[0] == want && fields[5] == w.fn {
				found = true
			}
		}
		if !found {
			t.Errorf("go tool pprof -top -unit=B output has no line with flat %s for %s:\n%s", want, w.fn, text)
		}
	}
	if !strings.Contains(text, "memprof: missed_frees=7") {
		t.Errorf("go tool pprof output lacks the profile comment:\n%s", text)
	}
}

func TestFramesMatchTopRows(t *testing.T) {
	m := &Mapping{Start: 0x1000, Limit: 0x2000, File: "/bin/x"}
	stack := []*Location{
		{Addr: 0x1100, Mapping: m, Lines: []Line{{Function: "inner", File: "a.c", Line: 3}, {Function: "outer", File: "a.c", Line: 9}}},
		{Addr: 0x1200, Mapping: m, Lines: []Line{{Function: "", SystemName: "_Z1fv", File: ""}}},
		{Addr: 0x1300, Mapping: m},
		{Addr: 0x1400, Mapping: m, Lines: []Line{{Function: "main", File: "m.c"}}},
	}
	built, err := Build(&Profile{SampleRate: 1, Samples: []Sample{{Stack: stack, Size: 8, AllocCount: 1, InuseCount: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := Top(built, "inuse_space", 1)
	if err != nil {
		t.Fatal(err)
	}
	got := Frames(stack)
	want := []string{"inner a.c:3", "outer a.c:9", "_Z1fv", "0x1300", "main m.c"}
	if strings.Join(got, "|") != strings.Join(rows[0].Frames, "|") || strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("Frames %q, Top %q, want %q", got, rows[0].Frames, want)
	}
	if sf := StackFrames(built.Sample[0].Location); strings.Join(sf, "|") != strings.Join(want, "|") {
		t.Fatalf("StackFrames %q", sf)
	}
}

// TestPrintable: names a target chose (its symbols, comm) cannot drive the
// terminal a summary or report is printed on: escape sequences, BEL, CR,
// NUL, C1 controls and bytes that are not UTF-8 are printed escaped, in
// FormatTop's frames and through PrintableWriter (which keeps newlines and
// tabs); plain names, UTF-8 included, are unchanged.
func TestPrintable(t *testing.T) {
	hostile := "\x1b]0;pwned\x07\x1b[2J\rA\x00B\u009b\xff\n\tz"
	want := `\x1b]0;pwned\x07\x1b[2J\x0dA\x00B\u009b\xff\x0a\x09z`
	if got := Printable(hostile); got != want {
		t.Errorf("Printable(%q) = %q, want %q", hostile, got, want)
	}
	for _, plain := range []string{"main", "std::vector<int>::push_back", "ünïcode 名前", ""} {
		if got := Printable(plain); got != plain {
			t.Errorf("Printable(%q) = %q, want it unchanged", plain, got)
		}
	}
	var sb strings.Builder
	if err := FormatTop(&sb, []StackRow{{Frames: []string{hostile, "main"}, Value: 1 << 20, Percent: 100, Objects: 1}}, "inuse_space", 8); err != nil {
		t.Fatal(err)
	}
	out := sb.String()
	if strings.ContainsAny(out, "\x1b\x07\r\x00") || !strings.Contains(out, want) {
		t.Errorf("FormatTop printed a frame unescaped:\n%q", out)
	}
	sb.Reset()
	w := PrintableWriter(&sb)
	if n, err := io.WriteString(w, "notes:\n\t"+hostile+"\n"); err != nil || n != len("notes:\n\t"+hostile+"\n") {
		t.Fatalf("PrintableWriter wrote %d, %v", n, err)
	}
	if got, want := sb.String(), "notes:\n\t"+`\x1b]0;pwned\x07\x1b[2J\x0dA\x00B\u009b\xff`+"\n\tz\n"; got != want {
		t.Errorf("PrintableWriter wrote %q, want %q", got, want)
	}
}
