package frag

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
)

const mib = 1 << 20

// fragRun is a running frag_glibc that has printed its truth and waits.
type fragRun struct {
	pid   int
	truth map[string]uint64
}

// runFrag starts frag_glibc with args (env added to the environment), through
// a shell that waits for a line first so the caller can move it into a
// cgroup (before is called with the pid, may be nil), and returns once it
// printed "ready". The process is ended at cleanup.
func runFrag(t *testing.T, env []string, before func(pid int), args ...string) *fragRun {
	t.Helper()
	return runFragBin(t, testprog.Build(t, "frag_glibc.c"), env, before, args...)
}

func runFragBin(t *testing.T, bin string, env []string, before func(pid int), args ...string) *fragRun {
	t.Helper()
	p := testprog.Start(t, "/bin/sh", env, append([]string{"-c", `read x; exec "$0" "$@"`, bin}, args...)...)
	if before != nil {
		before(p.Pid())
	}
	p.Send(t, "go")
	return &fragRun{pid: p.Pid(), truth: testprog.KeyValues(p.Expect(t, "ready"))}
}

// TestGlibcFragmented: 200k blocks of 256 B, every 16th kept. glibc cannot
// give back pages that hold a survivor, so RSS stays at the peak while
// mallinfo2 reports 1/16 of it live.
func TestGlibcFragmented(t *testing.T) {
	testprog.RequireRoot(t)
	r := runFrag(t, nil, nil, "frag", "200000", "256", "16")
	pm, err := ReadProcess(r.pid)
	if err != nil {
		t.Fatal(err)
	}
	a, detail := DetectAllocator(r.pid, nil)
	if a != Glibc || !strings.Contains(detail, "libc.so.6") {
		t.Fatalf("DetectAllocator = %s (%s), want glibc via libc.so.6", a, detail)
	}
	// mallinfo2: uordblks = in-use heap chunks, hblkhd = mmapped chunks
	// (the 1.6 MB pointer array); both are live.
	live := r.truth["glibc_uordblks"] + r.truth["glibc_hblkhd"]
	v := Assess(a, pm.RssAnon, live, &pm)
	t.Logf("glibc fragmented: RssAnon %d, mallinfo2 uordblks %d + hblkhd %d = live %d, arena %d; ratio %.2f excess %d alarm %v\n  %s\n  advice: %q",
		pm.RssAnon, r.truth["glibc_uordblks"], r.truth["glibc_hblkhd"], live, r.truth["glibc_arena"], v.Ratio, v.Excess, v.Alarm, v.Summary, v.Advice)
	if !v.Covered || v.Ratio <= 3 || !v.Alarm {
		t.Fatalf("ratio %.2f covered %v alarm %v, want covered, ratio > 3 (15 of 16 blocks freed, pages pinned) and an alarm", v.Ratio, v.Covered, v.Alarm)
	}
	// The truth the program printed must agree with the kernel: the arena
	// holds all the memory RssAnon counts, give or take 4 MiB of runtime.
	if d := int64(pm.RssAnon) - int64(r.truth["glibc_arena"]+r.truth["glibc_hblkhd"]); d < -4*mib || d > 4*mib {
		t.Errorf("RssAnon %d differs from glibc arena+hblkhd %d by %d, want within 4 MiB", pm.RssAnon, r.truth["glibc_arena"]+r.truth["glibc_hblkhd"], d)
	}
	if pv, err := AssessProcess(r.pid, live); err != nil || pv.Allocator != Glibc || !pv.Alarm || pv.Ratio < v.Ratio*0.95 || pv.Ratio > v.Ratio*1.05 {
		t.Errorf("AssessProcess = %+v, %v; want the same glibc alarm, ratio within 5%% of %.2f (RssAnon re-read)", pv, err, v.Ratio)
	}
	adv := strings.Join(v.Advice, "\n")
	for _, want := range []string{"malloc_trim(0)", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD=" + testprog.Jemalloc} {
		if !strings.Contains(adv, want) {
			t.Errorf("glibc advice lacks %q:\n%s", want, adv)
		}
	}
	if strings.Contains(adv, "MALLOC_ARENA_MAX") {
		t.Errorf("advice suggests MALLOC_ARENA_MAX for a single-threaded program with %d arenas", pm.GlibcArenas)
	}
}

// TestJemallocFragmented runs the same heap under jemalloc (LD_PRELOAD): its
// 256-byte slabs keep one survivor per page too.
func TestJemallocFragmented(t *testing.T) {
	testprog.RequireRoot(t)
	if _, err := os.Stat(testprog.Jemalloc); err != nil {
		t.Fatalf("%s missing: install the Debian package libjemalloc2", testprog.Jemalloc)
	}
	r := runFrag(t, []string{"LD_PRELOAD=" + testprog.Jemalloc}, nil, "frag", "200000", "256", "16")
	pm, err := ReadProcess(r.pid)
	if err != nil {
		t.Fatal(err)
	}
	a, detail := DetectAllocator(r.pid, nil)
	if a != Jemalloc || detail != testprog.Jemalloc {
		t.Fatalf("DetectAllocator = %s (%s), want jemalloc via %s", a, detail, testprog.Jemalloc)
	}
	alloc := r.truth["je_allocated"]
	if alloc == 0 {
		t.Fatalf("frag_glibc printed no je_allocated: mallctl not found through dlsym under LD_PRELOAD (truth %v)", r.truth)
	}
	v := Assess(a, pm.RssAnon, alloc, &pm)
	t.Logf("jemalloc fragmented: RssAnon %d, stats.allocated %d, stats.resident %d; ratio %.2f (resident/allocated %.2f) alarm %v\n  %s\n  advice: %q",
		pm.RssAnon, alloc, r.truth["je_resident"], v.Ratio, float64(r.truth["je_resident"])/float64(alloc), v.Alarm, v.Summary, v.Advice)
	want := float64(pm.RssAnon) / float64(alloc)
	if !v.Covered || v.Ratio != want || v.Ratio <= 3 || !v.Alarm {
		t.Fatalf("ratio %.3f covered %v alarm %v, want covered, exactly RssAnon/stats.allocated = %.3f, > 3 and alarmed", v.Ratio, v.Covered, v.Alarm, want)
	}
	adv := strings.Join(v.Advice, "\n")
	if !strings.Contains(adv, "MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0") || strings.Contains(adv, "malloc_trim") {
		t.Errorf("jemalloc advice should give MALLOC_CONF decay settings and no glibc advice:\n%s", adv)
	}
}

// TestJemallocStatic links jemalloc into the executable (libjemalloc_pic.a,
// exported with -rdynamic): no libjemalloc.so is mapped, the executable's
// own mallctl gives it away.
func TestJemallocStatic(t *testing.T) {
	testprog.RequireRoot(t)
	const lib = "/usr/lib/x86_64-linux-gnu/libjemalloc_pic.a"
	if _, err := os.Stat(lib); err != nil {
		t.Fatalf("%s missing: install the Debian package libjemalloc-dev", lib)
	}
	bin := testprog.Build(t, "frag_glibc.c", "-rdynamic", "-Wl,--whole-archive", lib, "-Wl,--no-whole-archive", "-lm", "-ldl", "-lstdc++")
	r := runFragBin(t, bin, nil, nil, "keep", "1000", "256")
	a, detail := DetectAllocator(r.pid, nil)
	if a != Jemalloc || detail != bin {
		t.Fatalf("DetectAllocator(static jemalloc) = %s (%s), want jemalloc (%s)", a, detail, bin)
	}
	if r.truth["je_allocated"] == 0 {
		t.Fatalf("the static jemalloc build printed no je_allocated (truth %v)", r.truth)
	}
}

// TestGlibcNoWaste keeps every block: RSS and live bytes agree.
func TestGlibcNoWaste(t *testing.T) {
	testprog.RequireRoot(t)
	r := runFrag(t, nil, nil, "keep", "200000", "256")
	pm, err := ReadProcess(r.pid)
	if err != nil {
		t.Fatal(err)
	}
	live := r.truth["glibc_uordblks"] + r.truth["glibc_hblkhd"]
	v := Assess(Glibc, pm.RssAnon, live, &pm)
	t.Logf("glibc keep-all: RssAnon %d, live %d, ratio %.3f alarm %v: %s", pm.RssAnon, live, v.Ratio, v.Alarm, v.Summary)
	if v.Ratio < 1.0 || v.Ratio > 1.3 || v.Alarm || len(v.Advice) != 0 {
		t.Fatalf("ratio %.3f alarm %v advice %q, want 1.0..1.3 (every block touched and kept; runtime pages add a little) and no alarm, no advice", v.Ratio, v.Alarm, v.Advice)
	}
}

// TestGlibcArenas: 4 threads malloc at once, each gets its own arena heap.
func TestGlibcArenas(t *testing.T) {
	testprog.RequireRoot(t)
	r := runFrag(t, nil, nil, "threads", "4", "4096")
	pm, err := ReadProcess(r.pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("4 allocating threads: GlibcArenas %d, Threads now %d, RssAnon %d", pm.GlibcArenas, pm.Threads, pm.RssAnon)
	if pm.GlibcArenas != 4 {
		t.Fatalf("GlibcArenas = %d, want 4 (one 64 MiB arena heap per thread that malloced concurrently)", pm.GlibcArenas)
	}
	// Advice for such a process, were it fragmented.
	v := Assess(Glibc, 100*mib, 10*mib, &pm)
	if !v.Alarm || !strings.Contains(strings.Join(v.Advice, "\n"), "MALLOC_ARENA_MAX=2") {
		t.Fatalf("advice for a fragmented glibc process with %d arenas: %q, want MALLOC_ARENA_MAX=2", pm.GlibcArenas, v.Advice)
	}
}

// TestCgroupLevel runs the fragmented glibc heap in its own memory cgroup and
// judges the cgroup: memory.stat anon against the program's live bytes.
func TestCgroupLevel(t *testing.T) {
	testprog.RequireRoot(t)
	v1, _ := cgroups.Root()
	if v1 == "" {
		t.Fatalf("no cgroup v1 memory controller under %s (CI hosts are hybrid)", cgroups.Base)
	}
	dir := filepath.Join(v1, fmt.Sprintf("memprof-frag-test-%d", os.Getpid()))
	if err := cgroups.Create(dir, 256*mib); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(dir); err != nil {
			t.Error(err)
		}
	})
	r := runFrag(t, nil, func(pid int) {
		if err := cgroups.AddProcess(dir, pid); err != nil {
			t.Fatal(err)
		}
	}, "frag", "200000", "256", "16")
	st, err := cgroups.ReadStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := ReadProcess(r.pid)
	if err != nil {
		t.Fatal(err)
	}
	live := r.truth["glibc_uordblks"] + r.truth["glibc_hblkhd"]
	v := AssessCgroup(st, live, []Allocator{Glibc})
	t.Logf("cgroup anon %d (process RssAnon %d), live %d: ratio %.2f alarm %v: %s", st.Anon, pm.RssAnon, live, v.Ratio, v.Alarm, v.Summary)
	if d := int64(st.Anon) - int64(pm.RssAnon); d < -2*mib || d > 2*mib {
		t.Errorf("cgroup anon %d vs the only process's RssAnon %d: differ by %d, want within 2 MiB", st.Anon, pm.RssAnon, d)
	}
	if !v.Covered || !v.Alarm || v.Ratio <= 3 {
		t.Fatalf("cgroup verdict ratio %.2f covered %v alarm %v, want covered, > 3 and alarmed", v.Ratio, v.Covered, v.Alarm)
	}
	if g := AssessCgroup(st, live, []Allocator{Glibc, Go}); g.Covered || !strings.Contains(g.Summary, "Go") {
		t.Fatalf("cgroup with a Go process: covered %v summary %q, want not covered and the reason", g.Covered, g.Summary)
	}
}

// TestDetectGo builds a Go program with `go build` and checks it is detected
// as Go and not judged by a malloc ratio.
func TestDetectGo(t *testing.T) {
	testprog.RequireRoot(t)
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = "/usr/local/go/bin/go"
	}
	dir := t.TempDir()
	src := "package main\n\nimport \"os\"\n\nfunc main() {\n\tb := make([]byte, 1)\n\tos.Stdout.WriteString(\"ready\\n\")\n\tos.Stdin.Read(b)\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module gowait\n\ngo 1.22\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "gowait")
	build := exec.Command(goTool, "build", "-o", bin, ".")
	build.Dir = dir
	build.Env = append(os.Environ(), "GOFLAGS=", "CGO_ENABLED=0", "GOWORK=off")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build of the test program: %v\n%s", err, b)
	}
	prog := testprog.Start(t, bin, nil)
	prog.Expect(t, "ready")
	a, detail := DetectAllocator(prog.Pid(), nil)
	if a != Go || detail != bin {
		t.Fatalf("DetectAllocator(Go program) = %s (%s), want go (%s)", a, detail, bin)
	}
	v := Assess(a, 100*mib, 10*mib, nil)
	if v.Covered || v.Alarm || v.Ratio != 0 || !strings.Contains(v.Summary, "Go runtime") {
		t.Fatalf("Go verdict %+v: want not covered, no ratio, and the reason", v)
	}
}

// TestThresholds checks the MEMORY DOCTOR rule at its edges.
func TestThresholds(t *testing.T) {
	cases := []struct {
		rss, live uint64
		alarm     bool
	}{
		{140 * mib, 100 * mib, false},             // ratio exactly 1.4: not above
		{141 * mib, 100 * mib, true},              // ratio 1.41, excess 41 MiB
		{30 * mib, 20*mib + 1, false},             // excess just under 10 MiB
		{30*mib + 1, 20 * mib, true},              // ratio 1.5, excess 10 MiB + 1
		{100 * mib, 10 * mib, true},               // ratio 10
		{10 * mib, 1 * mib, false},                // ratio 10 but excess 9 MiB
		{50 * mib, 60 * mib, false},               // RSS below live
		{0, 0, false},                             // nothing measured
		{200 * mib, 100 * mib, true},              // ratio 2
		{100*mib + AlarmExcess, 100 * mib, false}, // ratio 1.1
	}
	for _, c := range cases {
		v := Assess(Glibc, c.rss, c.live, nil)
		if v.Alarm != c.alarm {
			t.Errorf("Assess(rss %d, live %d): alarm %v ratio %.3f excess %d, want alarm %v (ratio > %.1f and excess > %d)", c.rss, c.live, v.Alarm, v.Ratio, v.Excess, c.alarm, AlarmRatio, AlarmExcess)
		}
	}
	for _, a := range []Allocator{Go, JVM, V8, Python, Unknown} {
		if v := Assess(a, 100*mib, 10*mib, nil); v.Covered || v.Alarm || v.Summary == "" {
			t.Errorf("Assess(%s): covered %v alarm %v summary %q, want not covered with a reason", a, v.Covered, v.Alarm, v.Summary)
		}
	}
}
