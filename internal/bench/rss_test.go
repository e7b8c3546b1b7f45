package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/internal/testprog"
)

// BenchmarkRSSFault: ns per anonymous page fault (mmap, touch 64 pages,
// munmap) with no BPF, with the RSS tier's programs loaded but the process
// not a target, and with it a target at the default rate. Configurations
// alternate over several runs; the fastest run of each is reported, and
// beside it the median over runs of each run's ratio to its own "none"
// (steadier than the ratio of the fastest runs when other load comes and
// goes).
func BenchmarkRSSFault(b *testing.B) {
	testprog.RequireRoot(b)
	bin := testprog.Build(b, "bench_faults.c", "-O2")
	names := []string{"none", "loaded-not-target", "target"}
	best := map[string]float64{}
	ratios := map[string][]float64{}
	for run := 0; run < benchRuns(); run++ {
		var none float64
		for _, name := range names {
			ns := runFaults(b, bin, name)
			if best[name] == 0 || ns < best[name] {
				best[name] = ns
			}
			if name == "none" {
				none = ns
			}
			ratios[name] = append(ratios[name], ns/none)
		}
	}
	none := best["none"]
	fmt.Printf("\nRSS tier, CPU ns per page fault (mmap + touch 64 pages + munmap; thread CPU time; fastest of %d alternating runs of 10 rounds; median of the runs' ratios):\n", benchRuns())
	for _, name := range names {
		fmt.Printf("  %-18s %7.1f ns  %.3fx none  (median ratio %.3f)\n", name, best[name], best[name]/none, median(ratios[name]))
		b.ReportMetric(best[name], name+"-ns/fault")
	}
	b.ReportMetric(0, "ns/op")
}

func runFaults(b *testing.B, bin, mode string) float64 {
	return runFaultsWith(b, bin, "1000", mode, nil)
}

// runFaultsWith runs bench_faults for budget ms; opts, if set, are the
// options of a session on it instead of mode's.
func runFaultsWith(b *testing.B, bin, budget, mode string, opts *rss.Options) float64 {
	cmd := exec.Command(bin, budget, "10")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer cmd.Wait()
	out := bufio.NewReader(stdout)
	if l, _ := out.ReadString('\n'); !strings.HasPrefix(l, "READY") {
		b.Fatalf("bench_faults: %q", l)
	}
	var s *rss.Session
	var err error
	if opts != nil {
		o := *opts
		o.Pids = []int{cmd.Process.Pid}
		s, err = rss.Start(context.Background(), o)
		mode = "target"
	}
	switch {
	case opts != nil:
	case mode == "loaded-not-target":
		s, err = rss.Start(context.Background(), rss.Options{Pids: []int{os.Getpid()}})
	case mode == "target":
		s, err = rss.Start(context.Background(), rss.Options{Pids: []int{cmd.Process.Pid}})
	}
	if err != nil {
		cmd.Process.Kill()
		b.Fatal(err)
	}
	fmt.Fprintln(stdin, "go")
	l, _ := out.ReadString('\n')
	if s != nil {
		if mode == "target" {
			if c, err := s.Counters(); err == nil && c.Folios == 0 {
				b.Errorf("target mode saw no faults")
			}
		}
		s.Close()
	}
	m := regexp.MustCompile(`min_ns=([0-9.]+)`).FindStringSubmatch(l)
	if m == nil {
		b.Fatalf("bench_faults: %q", l)
	}
	ns, _ := strconv.ParseFloat(m[1], 64)
	return ns
}

// BenchmarkRSSRedis: Debian's redis-server under redis-benchmark alone and
// with `record --rss` on it (the RSS tier, default rate), alternating.
func BenchmarkRSSRedis(b *testing.B) {
	testprog.RequireRoot(b)
	if _, err := exec.LookPath("redis-server"); err != nil {
		b.Fatalf("redis-server not installed: apt-get install redis-server redis-tools")
	}
	port := strconv.Itoa(20000 + os.Getpid()%20000)
	srv := exec.Command("redis-server", "--port", port, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1")
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	// The server's CPU time per request (user + system, from
	// /proc/PID/stat) is measured beside the throughput: on a busy machine
	// throughput mostly measures the other load, CPU time per request what
	// the server itself spends (including the BPF programs run in its
	// context).
	cpu := func() float64 {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", srv.Process.Pid))
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		return (ut + st) / 100 // USER_HZ
	}
	var cpuPer float64
	bench := func() float64 {
		c0 := cpu()
		defer func() { cpuPer = (cpu() - c0) / 300000 * 1e6 }()
		out, err := exec.Command("redis-benchmark", "-p", port, "-t", "set,get,lpush", "-c", "20", "-d", "256", "-n", "100000", "-q", "--csv").Output()
		if err != nil {
			b.Fatalf("redis-benchmark: %v", err)
		}
		// "SET","84245.99",... per test: the mean of the three rates
		var sum float64
		n := 0
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Split(line, ",")
			if len(f) < 2 {
				continue
			}
			v, err := strconv.ParseFloat(strings.Trim(f[1], `"`), 64)
			if err == nil {
				sum += v
				n++
			}
		}
		if n == 0 {
			b.Fatalf("redis-benchmark output: %q", out)
		}
		return sum / float64(n)
	}
	bench() // warm-up
	var plain, withRSS, plainCPU, rssCPU []float64
	runPlain := func() {
		plain = append(plain, bench())
		plainCPU = append(plainCPU, cpuPer)
	}
	runRSS := func() {
		s, err := rss.Start(context.Background(), rss.Options{Pids: []int{srv.Process.Pid}})
		if err != nil {
			b.Fatal(err)
		}
		withRSS = append(withRSS, bench())
		rssCPU = append(rssCPU, cpuPer)
		s.Close()
	}
	for i := 0; i < 6; i++ { // alternating, the order swapped every round
		if i%2 == 0 {
			runPlain()
			runRSS()
		} else {
			runRSS()
			runPlain()
		}
	}
	fmt.Printf("\nredis-server CPU µs per request (user+system, median of 6): plain %.2f, record --rss %.2f (%.3fx)\n",
		median(plainCPU), median(rssCPU), median(rssCPU)/median(plainCPU))
	// The best run of each: other load on the machine only slows runs down.
	p, r := maxOf(plain), maxOf(withRSS)
	fmt.Printf("\nredis-server under redis-benchmark -t set,get,lpush -c 20 -d 256 (requests/s, best of 6 alternating runs; plain %v, rss %v): plain %.0f, record --rss %.0f: %.1f%%\n", ints(plain), ints(withRSS), p, r, 100*r/p)
	b.ReportMetric(p, "plain-req/s")
	b.ReportMetric(r, "rss-req/s")
	b.ReportMetric(0, "ns/op")
}

func maxOf(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

func ints(v []float64) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

// BenchmarkRSSSampledFault: the RSS tier's cost per sampled fault, its
// stack walked in BPF with the CFI tables (the default) against the
// frame-pointer walk (--stack-mode fp): bench_faults (a 5-frame stack
// built with frame pointers, so both walks find the same frames) at
// --sample-rate 1, where every fault is sampled; the cost is the fault's
// CPU time above that with no BPF. Short rounds keep the sampled-page map
// (131,072 folios) from filling. Fastest of 5 alternating runs.
func BenchmarkRSSSampledFault(b *testing.B) {
	testprog.RequireRoot(b)
	bin := testprog.Build(b, "bench_faults.c", "-O2")
	type cfg struct {
		name string
		opts *rss.Options
	}
	cfgs := []cfg{{"none", nil}, {"fp", &rss.Options{SampleRate: 1, FramePointers: true}}, {"cfi", &rss.Options{SampleRate: 1}}}
	best := map[string]float64{}
	for run := 0; run < 5; run++ {
		for _, c := range cfgs {
			mode := "none"
			if c.opts != nil {
				mode = "target"
			}
			ns := runFaultsWith(b, bin, "60", mode, c.opts)
			if best[c.name] == 0 || ns < best[c.name] {
				best[c.name] = ns
			}
		}
	}
	none := best["none"]
	fmt.Printf("\nRSS tier, CPU ns per sampled fault above no BPF (every fault sampled: --sample-rate 1; 5-frame stack; fastest of 5 alternating runs):\n")
	fmt.Printf("  none (no BPF)        %7.1f ns per fault\n", none)
	for _, name := range []string{"fp", "cfi"} {
		fmt.Printf("  %-20s %+7.1f ns per sampled fault (%.2fx the frame-pointer walk's)\n", name+" walk", best[name]-none, (best[name]-none)/(best["fp"]-none))
		b.ReportMetric(best[name]-none, name+"-ns/sampled-fault")
	}
	b.ReportMetric(0, "ns/op")
}

// benchRuns is the number of alternating runs of BenchmarkRSSFault: 5, or
// $MEMPROF_RSS_BENCH_RUNS (more runs find the floor on a busy machine).
func benchRuns() int {
	if n, err := strconv.Atoi(os.Getenv("MEMPROF_RSS_BENCH_RUNS")); err == nil && n > 0 {
		return n
	}
	return 5
}
