package rss

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// known is a started rss_known-like program waiting for its go line.
type known struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

func startWaiting(t *testing.T, bin string, args ...string) *known {
	t.Helper()
	cmd := exec.Command(bin, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	return &known{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
}

// run sends the go line and waits for "ready".
func (k *known) run(t *testing.T) {
	t.Helper()
	fmt.Fprintln(k.stdin, "go")
	done := make(chan string, 1)
	go func() {
		for {
			l, err := k.out.ReadString('\n')
			if err != nil || strings.TrimSpace(l) == "ready" {
				done <- l
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("test program did not get ready")
	}
}

// byFunction sums rss_space and faulted_space of a built RSS profile per
// the first of funcs found in each stack ("" for none).
func byFunction(p *profile.Profile, funcs []string) (rss, faulted map[string]int64, total int64) {
	rss, faulted = map[string]int64{}, map[string]int64{}
	for _, s := range p.Sample {
		name := ""
	find:
		for _, loc := range s.Location {
			for _, ln := range loc.Line {
				for _, f := range funcs {
					if ln.Function != nil && ln.Function.Name == f {
						name = f
						break find
					}
				}
			}
		}
		rss[name] += s.Value[2]
		faulted[name] += s.Value[1]
		total += s.Value[2]
	}
	return rss, faulted, total
}

var knownFuncs = []string{"big_mallocs", "small_mallocs", "own_mmap", "thp_region", "unmapped", "dontneed", ResidentBefore}

const mib = 1 << 20

// truth of rss_known per function, bytes resident at "ready".
var knownTruth = map[string]float64{
	"big_mallocs":   32 * mib,
	"small_mallocs": 16384 * 1040, // 1 KiB blocks with glibc's 16-byte chunk header
	"own_mmap":      24 * mib,
	"thp_region":    8 * mib,
	"unmapped":      0,
	"dontneed":      0,
}

func recordKnown(t *testing.T, rate uint64) (*profile.Profile, []ProcSummary, frag.ProcessMem) {
	built, sums, pm, _ := recordKnownStacks(t, rate)
	return built, sums, pm
}

func recordKnownStacks(t *testing.T, rate uint64) (*profile.Profile, []ProcSummary, frag.ProcessMem, StackStats) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "rss_known.c")
	k := startWaiting(t, bin)
	s, err := Start(context.Background(), Options{SampleRate: rate, Pids: []int{k.cmd.Process.Pid}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	k.run(t)
	p, sums, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := frag.ReadProcess(k.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := s.Counters()
	t.Logf("counters: %+v", c)
	return built, sums, pm, s.StackStats()
}

func TestKnownRate1(t *testing.T) {
	built, sums, pm, st := recordKnownStacks(t, 1)
	// Every stack walked to main, none truncated (the process's tables
	// are built before it faults).
	attributed := rssWhere(built, func(f []string) bool { return len(f) == 0 || f[0] != ResidentBefore })
	toMain := rssWhere(built, func(f []string) bool { return slices.Contains(f, "main") })
	t.Logf("stacks reaching main: %.2f%% of %.2f MiB attributed; sampled faults %+v", 100*float64(toMain)/float64(attributed), float64(attributed)/mib, st)
	if float64(toMain) < 0.999*float64(attributed) {
		t.Errorf("stacks reaching main hold %.2f%% of rss_space, want >= 99.9%%", 100*float64(toMain)/float64(attributed))
	}
	if st.Truncated != 0 || st.Unknown != 0 {
		t.Errorf("sampled faults %+v: want no truncated or unavailable stack", st)
	}
	rss, faulted, total := byFunction(built, knownFuncs)
	for f, want := range knownTruth {
		got := float64(rss[f])
		t.Logf("%-14s rss_space %8.2f MiB (truth %6.2f), faulted %8.2f MiB", f, got/mib, want/mib, float64(faulted[f])/mib)
		if want == 0 {
			if got > 0.01*mib {
				t.Errorf("%s: rss_space %.2f MiB, want ~0 (given back)", f, got/mib)
			}
			if float64(faulted[f]) < 7.9*mib {
				t.Errorf("%s: faulted_space %.2f MiB, want 8 MiB", f, float64(faulted[f])/mib)
			}
			continue
		}
		if math.Abs(got-want) > 0.03*want {
			t.Errorf("%s: rss_space %.2f MiB, want %.2f within 3%%", f, got/mib, want/mib)
		}
	}
	t.Logf("unattributed %.2f MiB, before bucket %.2f MiB; total rss_space %.2f MiB, RssAnon %.2f MiB; summary %+v",
		float64(rss[""])/mib, float64(rss[ResidentBefore])/mib, float64(total)/mib, float64(pm.RssAnon)/mib, sums)
	// small_mallocs fills the brk heap; the rest is in anonymous mappings.
	if len(sums) != 1 || math.Abs(float64(sums[0].Regions.Brk)-knownTruth["small_mallocs"]) > 0.03*knownTruth["small_mallocs"] {
		t.Errorf("regions %+v: want the brk heap = small_mallocs' %.2f MiB", sums, knownTruth["small_mallocs"]/mib)
	}
	if d := math.Abs(float64(total) - float64(pm.RssAnon)); d > 0.03*float64(pm.RssAnon) {
		t.Errorf("total rss_space %.2f MiB vs RssAnon %.2f MiB: more than 3%% apart", float64(total)/mib, float64(pm.RssAnon)/mib)
	}
}

func TestKnownDefaultRate(t *testing.T) {
	const rate = DefaultSampleRate
	built, _, pm := recordKnown(t, rate)
	rss, _, total := byFunction(built, knownFuncs)
	for f, want := range knownTruth {
		got := float64(rss[f])
		if want == 0 {
			// A given-back region can only keep pages a sample missed: none.
			if got != 0 {
				t.Errorf("%s: rss_space %.2f MiB, want 0", f, got/mib)
			}
			continue
		}
		// Standard deviation of the Poisson estimate for N folios of
		// S bytes: S*sqrt(N*(1-q)/q), q = 1-exp(-S/rate).
		// Huge pages are sampled as 2 MiB folios (4 of them).
		size := 4096.0
		if f == "thp_region" {
			size = 2 * mib
		}
		q := 1 - math.Exp(-size/rate)
		sd := size * math.Sqrt(want/size*(1-q)/q)
		t.Logf("%-14s rss_space %8.2f MiB (truth %6.2f, sd %.2f)", f, got/mib, want/mib, sd/mib)
		if math.Abs(got-want) > 4*sd {
			t.Errorf("%s: rss_space %.2f MiB, want %.2f within 4 sd (%.2f MiB)", f, got/mib, want/mib, 4*sd/mib)
		}
	}
	t.Logf("total rss_space %.2f MiB, RssAnon %.2f MiB", float64(total)/mib, float64(pm.RssAnon)/mib)
}

// recordFunc starts bin (waiting for its go line), records it by pid at
// rate, and returns rss_space under stacks containing fn, the total, and
// the process's RssAnon at the snapshot.
func recordFunc(t *testing.T, rate uint64, fn string, bin string, args ...string) (inFn, total int64, rssAnon uint64) {
	t.Helper()
	k := startWaiting(t, bin, args...)
	s, err := Start(context.Background(), Options{SampleRate: rate, Pids: []int{k.cmd.Process.Pid}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	k.run(t)
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := frag.ReadProcess(k.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	rss, _, total := byFunction(built, []string{fn})
	if rows, err := pprofout.Top(built, pprofout.RSSSpace, 3); err == nil {
		var b strings.Builder
		pprofout.FormatTop(&b, rows, pprofout.RSSSpace, 12)
		t.Logf("top stacks:\n%s", b.String())
	}
	return rss[fn], total, pm.RssAnon
}

func TestGoLeak(t *testing.T) {
	testprog.RequireRoot(t)
	bin := t.TempDir() + "/rss_goleak"
	if out, err := exec.Command("go", "build", "-o", bin, testprog.Testdata("rss_goleak")).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	const want = 64 * mib
	for _, rate := range []uint64{1, DefaultSampleRate} {
		got, total, anon := recordFunc(t, rate, "main.leakSlices", bin, "64")
		q := 1 - math.Exp(-4096.0/float64(rate))
		tol := 0.03 * want
		if rate > 1 {
			tol = 4 * 4096 * math.Sqrt(want/4096*(1-q)/q)
		}
		t.Logf("rate %d: main.leakSlices rss_space %.2f MiB (truth 64, tolerance %.2f); total %.2f MiB, RssAnon %.2f MiB",
			rate, float64(got)/mib, tol/mib, float64(total)/mib, float64(anon)/mib)
		if math.Abs(float64(got)-want) > tol {
			t.Errorf("rate %d: main.leakSlices rss_space %.2f MiB, want 64 within %.2f", rate, float64(got)/mib, tol/mib)
		}
		if rate == 1 && math.Abs(float64(total)-float64(anon)) > 0.03*float64(anon) {
			t.Errorf("total rss_space %.2f MiB vs RssAnon %.2f MiB", float64(total)/mib, float64(anon)/mib)
		}
	}
}

func TestPythonGrow(t *testing.T) {
	testprog.RequireRoot(t)
	// Debian's interpreter (not a wrapper script: pyenv shims fork); its
	// static functions are named from python3-dbg's separate debug file,
	// found by build ID (both in the Makefile's APT_PKGS).
	out, err := exec.Command("/usr/bin/python3", "-c", "import sys; print(sys.executable)").Output()
	if err != nil {
		t.Fatalf("python3: %v", err)
	}
	py := strings.TrimSpace(string(out))
	// bytes repetition fills each 64 KiB object: the pages fault in
	// memset under CPython's bytes_repeat (Objects/bytesobject.c, 3.11).
	const want = 64 * mib
	got, total, anon := recordFunc(t, 1, "bytes_repeat", py, testprog.Testdata("rss_pygrow.py"))
	t.Logf("bytes_repeat rss_space %.2f MiB (truth 64 + object headers); total %.2f MiB, RssAnon %.2f MiB", float64(got)/mib, float64(total)/mib, float64(anon)/mib)
	if math.Abs(float64(got)-want) > 0.05*want {
		t.Errorf("bytes_repeat rss_space %.2f MiB, want 64 within 5%%", float64(got)/mib)
	}
	if math.Abs(float64(total)-float64(anon)) > 0.03*float64(anon) {
		t.Errorf("total rss_space %.2f MiB vs RssAnon %.2f MiB", float64(total)/mib, float64(anon)/mib)
	}
}

func TestJVMGrow(t *testing.T) {
	testprog.RequireRoot(t)
	if _, err := exec.LookPath("javac"); err != nil {
		t.Fatalf("javac not found (Debian default-jdk-headless, in the Makefile's APT_PKGS): %v", err)
	}
	dir := t.TempDir()
	if out, err := exec.Command("javac", "-d", dir, testprog.Testdata("RssGrow.java")).CombinedOutput(); err != nil {
		t.Fatalf("javac: %v\n%s", err, out)
	}
	java, err := exec.LookPath("java")
	if err != nil {
		t.Fatal(err)
	}
	// 64 arrays of 1 MiB, allocated by the interpreter (InterpreterRuntime::newarray)
	// and zeroed by the VM (JIT and interpreter frames above it are unsymbolized).
	const want = 64 * mib
	got, total, anon := recordFunc(t, 1, "MemAllocator::allocate", java, "-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-cp", dir, "RssGrow")
	t.Logf("MemAllocator::allocate rss_space %.2f MiB (truth 64); total %.2f MiB, RssAnon %.2f MiB", float64(got)/mib, float64(total)/mib, float64(anon)/mib)
	if math.Abs(float64(got)-want) > 0.05*want {
		t.Errorf("MemAllocator::allocate rss_space %.2f MiB, want 64 within 5%%", float64(got)/mib)
	}
	if math.Abs(float64(total)-float64(anon)) > 0.03*float64(anon) {
		t.Errorf("total rss_space %.2f MiB vs RssAnon %.2f MiB", float64(total)/mib, float64(anon)/mib)
	}
}

// Memory made resident before the recording starts is one explicit bucket,
// not dropped and not attributed to the stacks that fault later.
func TestResidentBefore(t *testing.T) {
	testprog.RequireRoot(t)
	bin := t.TempDir() + "/rss_goleak"
	if out, err := exec.Command("go", "build", "-o", bin, testprog.Testdata("rss_goleak")).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	k := startWaiting(t, bin, "32")
	k.run(t) // 32 MiB resident before memprof starts
	s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{k.cmd.Process.Pid}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fmt.Fprintln(k.stdin, "more 16")
	if l, err := k.out.ReadString('\n'); err != nil || strings.TrimSpace(l) != "ready" {
		t.Fatalf("rss_goleak: %q %v", l, err)
	}
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	rss, _, total := byFunction(built, []string{"main.leakMore", ResidentBefore})
	pm, _ := frag.ReadProcess(k.cmd.Process.Pid)
	t.Logf("main.leakMore %.2f MiB (truth 16), %s %.2f MiB (truth 32 + runtime), total %.2f MiB, RssAnon %.2f MiB",
		float64(rss["main.leakMore"])/mib, ResidentBefore, float64(rss[ResidentBefore])/mib, float64(total)/mib, float64(pm.RssAnon)/mib)
	if got := float64(rss["main.leakMore"]); math.Abs(got-16*mib) > 0.03*16*mib {
		t.Errorf("main.leakMore rss_space %.2f MiB, want 16", got/mib)
	}
	if got := float64(rss[ResidentBefore]); got < 32*mib || got > 36*mib {
		t.Errorf("%s %.2f MiB, want 32 MiB plus the runtime's own (< 4 MiB)", ResidentBefore, got/mib)
	}
}
