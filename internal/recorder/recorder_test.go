package recorder

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// site is the truth a test program states about one allocation site.
type site struct {
	fn         string
	inuse      int64 // live bytes at the end
	allocBytes int64 // bytes allocated during the run (0: not checked)
}

// leakyTruth is what testdata/rec_leaky.c allocates (see its header).
var leakyTruth = []site{
	{"leak_small", 1_000_000, 1_000_000},
	{"leak_calloc", 1_000_000, 1_000_000},
	{"grow_realloc", 2_097_152, 34_603_008}, // sum of k*64KiB, k=1..32
	{"leak_memalign", 1_000_000, 1_000_000},
	{"leak_aligned", 640_000, 640_000},
	{"thread_leak", 1_000_000, 1_000_000},
	{"churn", 0, 40_960_000},
	{"edge_cases", 9_000, 0},
}

// bySite sums a sample type per immediate caller of the allocator (the
// innermost function of the first frame).
func bySite(t *testing.T, p *profile.Profile, sampleType string) map[string]int64 {
	t.Helper()
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == sampleType {
			idx = i
		}
	}
	if idx < 0 {
		t.Fatalf("profile has no sample type %s", sampleType)
	}
	out := map[string]int64{}
	for _, s := range p.Sample {
		name := "?"
		if len(s.Location) > 0 && len(s.Location[0].Line) > 0 {
			name = s.Location[0].Line[0].Function.Name
		}
		out[name] += s.Value[idx]
	}
	return out
}

func record(t *testing.T, opts Options, run func(s *Session)) *profile.Profile {
	t.Helper()
	testprog.RequireRoot(t)
	s, err := Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("start session: %v", err)
	}
	defer s.Close()
	run(s)
	p, err := s.Profile()
	if err != nil {
		t.Fatalf("profile: %v", err)
	}
	built, err := pprofout.Build(p)
	if err != nil {
		t.Fatalf("build profile: %v", err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "heap.pb.gz")
	if err := pprofout.WriteFile(path, p); err != nil {
		t.Fatal(err)
	}
	back, err := pprofout.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := back.CheckValid(); err != nil {
		t.Fatalf("written profile invalid: %v", err)
	}
	_ = built
	return back
}

func checkExact(t *testing.T, p *profile.Profile, truth []site) {
	t.Helper()
	inuse := bySite(t, p, "inuse_space")
	alloc := bySite(t, p, "alloc_space")
	for _, s := range truth {
		if inuse[s.fn] != s.inuse {
			t.Errorf("%s: inuse_space %d, want exactly %d (sample rate 1)", s.fn, inuse[s.fn], s.inuse)
		}
		if s.allocBytes != 0 && alloc[s.fn] != s.allocBytes {
			t.Errorf("%s: alloc_space %d, want exactly %d (sample rate 1)", s.fn, alloc[s.fn], s.allocBytes)
		}
	}
	if t.Failed() {
		t.Logf("inuse by site: %v", inuse)
		t.Logf("alloc by site: %v", alloc)
	}
}

// TestRecordPidExact attaches to a running process and checks every site's
// live and allocated bytes exactly at --sample-rate 1, under glibc and under
// jemalloc preloaded.
func TestRecordPidExact(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c")
	for _, tc := range []struct {
		name                string
		env                 []string
		perProbe, noSession bool
	}{
		{"glibc", nil, false, false},
		{"jemalloc", []string{"LD_PRELOAD=" + testprog.Jemalloc}, false, false},
		// The path kernels without uprobe sessions (6.6-6.12) take.
		{"glibc-multi-links", nil, false, true},
		{"jemalloc-multi-links", []string{"LD_PRELOAD=" + testprog.Jemalloc}, false, true},
		// The path kernels without uprobe_multi take.
		{"glibc-perf-event-links", nil, true, false},
		{"jemalloc-perf-event-links", []string{"LD_PRELOAD=" + testprog.Jemalloc}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prog := testprog.Start(t, bin, tc.env, "--wait-start", "--wait-end")
			prog.Expect(t, "READY")
			p := record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}, PerProbeLinks: tc.perProbe, NoSession: tc.noSession}, func(s *Session) {
				if want := 2; !tc.perProbe && s.Links() > 2*len(s.Objects()) {
					t.Errorf("%d links for %d objects, want at most %d per object with uprobe_multi", s.Links(), len(s.Objects()), want)
				}
				if tc.env != nil {
					found := false
					for _, o := range s.Objects() {
						found = found || o.Allocator == "jemalloc"
					}
					if !found {
						t.Fatalf("jemalloc not among attached objects %v", s.Objects())
					}
				}
				prog.Send(t, "go")
				prog.Expect(t, "DONE")
			})
			checkExact(t, p, leakyTruth)
			// The default cfi mode walks every stack in BPF: the tables
			// are built before the probes fire, so nothing is copied.
			if v, _ := pprofoutComment(p, "stacks_unwound"); v != "0" {
				t.Errorf("%s stacks copied for unwinding in userspace, want 0 (cfi mode, tables built before attaching)", v)
			}
			if v, _ := pprofoutComment(p, "stacks_truncated"); v != "0" {
				t.Errorf("%s stacks truncated, want 0", v)
			}
			// Labels: pid and comm on every sample.
			for _, s := range p.Sample {
				if s.Label["pid"][0] != fmt.Sprint(prog.Pid()) || s.Label["comm"][0] != "rec_leaky" {
					t.Fatalf("sample labels %v, want pid %d comm rec_leaky", s.Label, prog.Pid())
				}
			}
		})
	}
}

// TestRecordStaticAllocator: glibc linked statically into the executable
// is found in the executable itself and profiled exactly.
func TestRecordStaticAllocator(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c", "-static")
	prog := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
	prog.Expect(t, "READY")
	p := record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}}, func(s *Session) {
		objs := s.Objects()
		if len(objs) != 1 || objs[0].Allocator != "static" {
			t.Fatalf("attached objects %+v, want the executable as a static allocator", objs)
		}
		prog.Send(t, "go")
		prog.Expect(t, "DONE")
	})
	checkExact(t, p, leakyTruth)
}

// TestRecordCommand starts the program with the probes in place: its first
// allocation (early_alloc, before anything else in main) is in the profile,
// and the state at exit is kept after the process is gone.
func TestRecordCommand(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c")
	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"glibc", nil},
		{"jemalloc-preload", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var reason string
			p := record(t, Options{SampleRate: 1, Command: []string{bin}, Env: append(os.Environ(), tc.env...)}, func(s *Session) {
				reason = s.Wait(context.Background(), 60*time.Second)
			})
			if reason != "command exited with status 0" {
				t.Fatalf("session ended with %q, want the command's clean exit", reason)
			}
			truth := append([]site{{"early_alloc", 12345, 12345}}, leakyTruth...)
			checkExact(t, p, truth)
		})
	}
}

// TestRecordCxx checks operator new/delete under libstdc++ (glibc) and
// jemalloc, whose operator new never calls malloc.
func TestRecordCxx(t *testing.T) {
	bin := testprog.Build(t, "rec_cxx.cc")
	truth := []site{
		{"cxx::Cache::fill", 1_000_000, 1_000_000},
		{"cxx::make_node", 48_000, 48_000},
		{"cxx::churn_nodes", 0, 480_000},
	}
	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"glibc", nil},
		{"jemalloc", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := record(t, Options{SampleRate: 1, Command: []string{bin}, Env: append(os.Environ(), tc.env...)}, func(s *Session) {
				s.Wait(context.Background(), 60*time.Second)
			})
			checkExact(t, p, truth)
		})
	}
}

// TestRecordCxxDefaultRate: libstdc++'s operator new calls malloc and both
// are probed. At the default rate, with uprobe sessions (the return probe
// only for calls that need it), new must stay pending as a wrapper: else the
// malloc nested in a new that was not sampled gets a second sampling chance
// on the same bytes (measured: ~480 MiB estimated for 256 MiB, half of it
// under "operator new"). All live bytes of the program are summed,
// whatever the leaf of their stacks.
func TestRecordCxxDefaultRate(t *testing.T) {
	bin := testprog.Build(t, "rec_cxx.cc")
	p := record(t, Options{Command: []string{bin, "--big"}}, func(s *Session) {
		s.Wait(context.Background(), 60*time.Second)
	})
	var got int64
	for _, smp := range p.Sample {
		got += smp.Value[3]
	}
	// big_new 268,435,456 + fill 1,000,000 + make_node 48,000 + the
	// vector's 131,072; libstdc++'s own start-up allocations are small.
	const want = 269_614_528
	// 64 KiB blocks at 512 KiB: p = 0.118, 4096 blocks, sd 4.3%: ~4.5 sd.
	errPc := 100 * math.Abs(float64(got)-want) / want
	t.Logf("live bytes: estimated %d, truth %d, error %.1f%% (tolerance 20%%)", got, want, errPc)
	if errPc > 20 {
		t.Errorf("live bytes estimate %d is %.1f%% off the truth %d (tolerance 20%%)", got, errPc, want)
	}
}

// TestRecordDefaultRate checks the Poisson sampler and the unsampling at the
// default 512 KiB rate on multi-MiB sites.
func TestRecordDefaultRate(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c")
	prog := testprog.Start(t, bin, nil, "--wait-start", "--wait-end", "--big")
	prog.Expect(t, "READY")
	p := record(t, Options{Pids: []int{prog.Pid()}}, func(s *Session) {
		prog.Send(t, "go")
		prog.Expect(t, "DONE")
	})
	if p.Period != DefaultSampleRate {
		t.Errorf("profile period %d, want %d", p.Period, DefaultSampleRate)
	}
	inuse := bySite(t, p, "inuse_space")
	alloc := bySite(t, p, "alloc_space")
	// Tolerances are 4 standard deviations of the estimate: 2 MiB blocks are
	// sampled with p = 1-exp(-4) = 0.982 (32 blocks: sd 2.4%), 16 KiB blocks
	// with p = 0.031 (8192 blocks: sd 6.3%), churn's 4 KiB blocks with
	// p = 0.0078 (10000 blocks: sd 11%).
	for _, c := range []struct {
		fn    string
		got   int64
		want  float64
		tolPc float64
	}{
		{"big_blocks", inuse["big_blocks"], 67_108_864, 10},
		{"many_small", inuse["many_small"], 134_217_728, 25},
		{"churn (alloc)", alloc["churn"], 40_960_000, 45},
	} {
		errPc := 100 * math.Abs(float64(c.got)-c.want) / c.want
		t.Logf("%s: estimated %d, truth %.0f, error %.1f%% (tolerance %.0f%%)", c.fn, c.got, c.want, errPc, c.tolPc)
		if errPc > c.tolPc {
			t.Errorf("%s: estimate %d is %.1f%% off the truth %.0f (tolerance %.0f%%)", c.fn, c.got, errPc, c.want, c.tolPc)
		}
	}
	if inuse["churn"] != 0 {
		t.Errorf("churn: %d live bytes, want 0 (everything freed)", inuse["churn"])
	}
}

// TestRecordCgroup profiles by cgroup: the process is found through the
// cgroup's process list, labelled with its cgroup, and its live blocks carry
// that memory cgroup's id.
func TestRecordCgroup(t *testing.T) {
	testprog.RequireRoot(t)
	v1, v2 := cgroups.Root()
	root := v1
	if root == "" {
		root = v2
	}
	dir := filepath.Join(root, fmt.Sprintf("memprof-test-rec-%d", os.Getpid()))
	if err := cgroups.Create(dir, 0); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })
	bin := testprog.Build(t, "rec_leaky.c")
	prog := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
	prog.Expect(t, "READY")
	if err := cgroups.AddProcess(dir, prog.Pid()); err != nil {
		t.Fatal(err)
	}
	var memcg uint64
	p := record(t, Options{SampleRate: 1, Cgroups: []string{dir}}, func(s *Session) {
		prog.Send(t, "go")
		prog.Expect(t, "DONE")
		snap, err := s.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		memcg = snap.Memcg[uint32(prog.Pid())]
	})
	checkExact(t, p, leakyTruth)
	want := "/" + filepath.Base(dir)
	for _, s := range p.Sample {
		if got := s.Label["cgroup"]; len(got) != 1 || got[0] != want {
			t.Fatalf("sample cgroup label %v, want %q", got, want)
		}
	}
	id, err := cgroups.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	if memcg != id {
		t.Errorf("live blocks carry memory cgroup id %d, want %d (inode of %s)", memcg, id, dir)
	}
}

// TestRecordErrors checks the errors a user can act on.
func TestRecordErrors(t *testing.T) {
	testprog.RequireRoot(t)
	_, err := Start(context.Background(), Options{Pids: []int{1 << 30}})
	if err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("missing pid: error %v, want 'not found'", err)
	}
	_, err = Start(context.Background(), Options{Cgroups: []string{"/sys/fs/cgroup/memory/no-such-memprof-cgroup"}})
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing cgroup: error %v, want 'does not exist'", err)
	}
	_, err = Start(context.Background(), Options{})
	if err == nil || !strings.Contains(err.Error(), "nothing to record") {
		t.Errorf("no target: error %v", err)
	}
	// A Go program has no allocator memprof can probe.
	goBin := filepath.Join(t.TempDir(), "gosleep")
	src := filepath.Join(t.TempDir(), "main.go")
	os.WriteFile(src, []byte("package main\nimport \"time\"\nfunc main(){time.Sleep(time.Minute)}\n"), 0o644)
	if out, err := exec.Command("go", "build", "-o", goBin, src).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(goBin)
	cmd.Start()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	time.Sleep(100 * time.Millisecond)
	_, err = Start(context.Background(), Options{Pids: []int{cmd.Process.Pid}})
	if err == nil || !strings.Contains(err.Error(), "no allocator found") {
		t.Errorf("Go process: error %v, want 'no allocator found'", err)
	}
}

// TestRecordTargetExits checks that a target exiting mid-recording keeps its
// state in the profile.
func TestRecordTargetExits(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c")
	prog := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
	prog.Expect(t, "READY")
	var reason string
	p := record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}}, func(s *Session) {
		prog.Send(t, "go")
		prog.Expect(t, "DONE")
		prog.Send(t, "go") // let it exit
		reason = s.Wait(context.Background(), 30*time.Second)
	})
	if reason != "all targets exited" {
		t.Fatalf("session ended with %q, want all targets exited", reason)
	}
	checkExact(t, p, leakyTruth)
}

// TestRecordCommandExecs: a command that execs the real program (env, as
// shell wrappers do) still has it profiled from its first allocation, with
// the allocator the new program preloads.
func TestRecordCommandExecs(t *testing.T) {
	bin := testprog.Build(t, "rec_leaky.c")
	p := record(t, Options{SampleRate: 1, Command: []string{"env", "LD_PRELOAD=" + testprog.Jemalloc, bin}}, func(s *Session) {
		if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
			t.Fatalf("session ended with %q", r)
		}
		found := false
		for _, o := range s.Objects() {
			found = found || o.Allocator == "jemalloc"
		}
		if !found {
			t.Errorf("jemalloc, preloaded by the exec'd program, was not attached")
		}
		// env's own blocks went with its image.
		if n := s.TargetCounts()[execReplaced]; n != 1 {
			t.Errorf("%d images replaced by exec counted, want 1 (env)", n)
		}
	})
	truth := append([]site{{"early_alloc", 12345, 12345}}, leakyTruth...)
	checkExact(t, p, truth)
}

// TestOthersPayNothing: probes are planted only in the targets. Another
// process using the same libc runs malloc+free at full speed while a target
// is profiled, and the BPF side counts none of its calls.
func TestOthersPayNothing(t *testing.T) {
	leaky := testprog.Build(t, "rec_leaky.c")
	pairs := testprog.Build(t, "bench_pairs.c", "-O2")
	target := testprog.Start(t, leaky, nil, "--wait-start", "--wait-end")
	target.Expect(t, "READY")
	other := testprog.Start(t, pairs, nil, "64", "300", "3")
	other.Expect(t, "READY")
	record(t, Options{Pids: []int{target.Pid()}}, func(s *Session) {
		before, _ := s.Counters()
		other.Send(t, "go")
		line, _ := other.Until(t, "RESULT", time.Minute)
		after, _ := s.Counters()
		var ns float64
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "min_ns="); ok {
				fmt.Sscan(v, &ns)
			}
		}
		t.Logf("non-target: %.1f ns per malloc+free pair while a target is profiled; BPF calls counted meanwhile: %d", ns, after.Calls-before.Calls)
		// A probed pair costs ~2,200 ns here, an unprobed one ~10-20 ns.
		if ns == 0 || ns > 300 {
			t.Errorf("non-target pays %.1f ns per pair (line %q), want < 300 ns: it is being probed", ns, line)
		}
		if after.Calls != before.Calls {
			t.Errorf("BPF counted %d calls of a non-target", after.Calls-before.Calls)
		}
		calls, _ := s.ProcCalls()
		if _, ok := calls[uint32(other.Pid())]; ok {
			t.Errorf("non-target pid %d has a call count", other.Pid())
		}
	})
}
