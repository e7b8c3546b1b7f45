package agentbench

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

var (
	podsFlag   = flag.String("pods", "25,100,200", "pod counts to run, comma-separated")
	windowFlag = flag.Duration("window", 30*time.Second, "CPU measurement window once every pod is attached")
	perfFlag   = flag.String("perf", "", "directory to record a perf CPU profile of the agent over each window into")
	binFlag    = flag.String("memprof", "", "run this memprof binary instead of building ./cmd/memprof (two builds compared back to back)")
)

const (
	v1Memory   = "/sys/fs/cgroup/memory"
	blocksPerS = 200 // allocations per second of each pod's process
	startRate  = 20  // pods started per second
	scrapeStep = 15 * time.Second
	// userHZ is the unit of utime and stime in /proc/PID/stat (USER_HZ,
	// 100 on every Linux architecture's user ABI).
	userHZ = 100
)

// result is one row of the table.
type result struct {
	pods                 int
	cpuPct               float64 // % of one core over the window
	rssAnon, rssTotal    uint64  // bytes, largest seen in the window
	goHeap               float64 // go_memstats_heap_inuse_bytes at the end
	latMedian, latMax    time.Duration
	attached, unattached int
	ooms                 float64 // OOM kills on the node in the window (each one costs the agent a report)
}

func BenchmarkAgent(b *testing.B) {
	testprog.RequireRoot(b)
	var counts []int
	for _, f := range strings.Split(*podsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			b.Fatalf("bad -pods entry %q", f)
		}
		counts = append(counts, n)
	}
	memprof := *binFlag
	if memprof == "" {
		memprof = filepath.Join(b.TempDir(), "memprof")
		build := exec.Command("go", "build", "-o", memprof, "./cmd/memprof")
		build.Dir = testprog.Root()
		if out, err := build.CombinedOutput(); err != nil {
			b.Fatalf("go build ./cmd/memprof: %v\n%s", err, out)
		}
	}
	wl := testprog.Build(b, "agent_workload.c")
	var rows []result
	for _, n := range counts {
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			r := runOnce(b, memprof, wl, n)
			b.ReportMetric(r.cpuPct, "%core")
			b.ReportMetric(float64(r.rssAnon)/(1<<20), "MiB-anon")
			b.ReportMetric(float64(r.rssTotal)/(1<<20), "MiB-rss")
			b.ReportMetric(float64(r.latMedian.Milliseconds()), "ms-to-profiled")
			rows = append(rows, r)
		})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "\nmemprof agent's own cost (CPU: utime+stime over %s, %d allocations/s per pod)\n", *windowFlag, blocksPerS)
	fmt.Fprintln(w, "pods\tCPU % of a core\tRSS anon MiB\tRSS total MiB\tGo heap MiB\tto first profiled alloc, median\tmax\tnot attached\tnode OOM kills in window\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%d\t%.2f\t%.1f\t%.1f\t%.1f\t%s\t%s\t%d\t%.0f\t\n", r.pods, r.cpuPct,
			float64(r.rssAnon)/(1<<20), float64(r.rssTotal)/(1<<20), r.goHeap/(1<<20),
			r.latMedian.Round(time.Millisecond), r.latMax.Round(time.Millisecond), r.unattached, r.ooms)
	}
	w.Flush()
}

var (
	attachRe = regexp.MustCompile(`attached to process (\d+) `)
	listenRe = regexp.MustCompile(` listen=(\S+) `) // the agent's start record (text log format)
)

// runOnce starts the agent, then n pods while it runs, waits until it has
// attached to all, and measures the window.
func runOnce(b *testing.B, memprof, wl string, n int) result {
	fsRoot := fmt.Sprintf("memprof-agentbench-%d-%d", os.Getpid(), n)
	b.Cleanup(func() { kube.RemoveCgroupTree(b, fsRoot) })
	tmp := b.TempDir()
	logs := filepath.Join(tmp, "pods")
	token := filepath.Join(tmp, "token")
	kube.WriteFile(b, token, kube.RandHex(32)+"\n")
	ns := "agentbench"

	agent := exec.Command(memprof, "agent", "--listen=127.0.0.1:0", "--token-file="+token,
		"--data-dir="+filepath.Join(tmp, "data"), "--namespace="+ns, "--node-name=bench",
		"--pod-logs="+logs, "--cri-socket="+filepath.Join(tmp, "no-cri.sock"))
	stderr, err := agent.StderrPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := agent.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan struct{})
	b.Cleanup(func() {
		t0 := time.Now()
		agent.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			b.Logf("%d pods: the agent stopped %s after SIGTERM", n, time.Since(t0).Round(time.Millisecond))
		case <-time.After(60 * time.Second):
			b.Errorf("the agent did not stop within 60s of SIGTERM")
			agent.Process.Kill()
			<-exited
		}
	})
	var (
		mu       sync.Mutex
		attachAt = map[int]time.Time{}
		logTail  []string
	)
	addrCh := make(chan string, 1)
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			now, line := time.Now(), sc.Text()
			mu.Lock()
			if m := attachRe.FindStringSubmatch(line); m != nil {
				pid, _ := strconv.Atoi(m[1])
				if _, ok := attachAt[pid]; !ok {
					attachAt[pid] = now
				}
			} else {
				logTail = append(logTail, line)
				if len(logTail) > 20 {
					logTail = logTail[1:]
				}
			}
			mu.Unlock()
			if m := listenRe.FindStringSubmatch(line); m != nil {
				addrCh <- m[1]
			}
		}
		io.Copy(io.Discard, stderr)
		agent.Wait()
	}()
	var addr string
	select {
	case addr = <-addrCh:
	case <-exited:
		b.Fatalf("the agent exited at start: %v", logTail)
	case <-time.After(60 * time.Second):
		b.Fatalf("the agent did not start listening within 60s: %v", logTail)
	}

	// n pods, started while the agent runs.
	joinAt := map[int]time.Time{}
	tick := time.NewTicker(time.Second / startRate)
	for i := 0; i < n; i++ {
		<-tick.C
		pod := kube.Pod{Namespace: ns, Name: fmt.Sprintf("p%d", i), UID: kube.NewUID()}
		dir := kube.MkCgroup(b, v1Memory, pod.CgroupParent(fsRoot, "besteffort")+"/"+kube.NewID())
		pod.WriteLog(b, logs, "app")
		cmd := exec.Command(wl, "trickle", filepath.Join(dir, "cgroup.procs"), strconv.Itoa(blocksPerS))
		out, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		line, err := bufio.NewReader(out).ReadString('\n')
		var ns int64
		if _, serr := fmt.Sscanf(line, "joined %d", &ns); err != nil || serr != nil {
			b.Fatalf("pod %d: workload said %q (%v)", i, line, err)
		}
		joinAt[cmd.Process.Pid] = time.Unix(0, ns)
		go io.Copy(io.Discard, out)
	}
	tick.Stop()
	deadline := time.Now().Add(time.Duration(n)*200*time.Millisecond + 60*time.Second)
	for {
		mu.Lock()
		got := 0
		for pid := range joinAt {
			if _, ok := attachAt[pid]; ok {
				got++
			}
		}
		mu.Unlock()
		if got == n {
			break
		}
		if time.Now().After(deadline) {
			b.Logf("only %d of %d pods attached; agent log: %v", got, n, logTail)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	r := result{pods: n}
	var lat []time.Duration
	mu.Lock()
	for pid, j := range joinAt {
		if at, ok := attachAt[pid]; ok {
			lat = append(lat, at.Sub(j))
		}
	}
	mu.Unlock()
	r.attached, r.unattached = len(lat), n-len(lat)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) > 0 {
		r.latMedian, r.latMax = lat[len(lat)/2], lat[len(lat)-1]
	}

	time.Sleep(5 * time.Second) // settle: attach work done
	pid := agent.Process.Pid
	var perf *exec.Cmd
	if *perfFlag != "" {
		os.MkdirAll(*perfFlag, 0o755)
		perf = exec.Command("perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(pid),
			"-o", filepath.Join(*perfFlag, fmt.Sprintf("agent-%d.data", n)))
		if err := perf.Start(); err != nil {
			b.Logf("perf: %v", err)
			perf = nil
		}
	}
	t0, c0 := time.Now(), cpuTicks(b, pid)
	nextScrape := t0
	oom0 := -1.0
	for time.Since(t0) < *windowFlag {
		if time.Now().After(nextScrape) {
			var ooms float64
			r.goHeap, ooms = scrape(b, addr)
			if oom0 < 0 {
				oom0 = ooms
			}
			r.ooms = ooms - oom0
			nextScrape = nextScrape.Add(scrapeStep)
		}
		anon, total := rss(b, pid)
		r.rssAnon, r.rssTotal = max(r.rssAnon, anon), max(r.rssTotal, total)
		time.Sleep(time.Second)
	}
	c1, t1 := cpuTicks(b, pid), time.Now()
	r.cpuPct = 100 * float64(c1-c0) / userHZ / t1.Sub(t0).Seconds()
	if perf != nil {
		perf.Process.Signal(syscall.SIGINT)
		perf.Wait()
	}
	if _, ooms := scrape(b, addr); oom0 >= 0 {
		r.ooms = ooms - oom0
	}
	b.Logf("%d pods: CPU %.2f%% of a core, RSS anon %.1f MiB total %.1f MiB, Go heap %.1f MiB; attach after start: median %s, max %s, %d not attached; %.0f OOM kills on the node in the window",
		n, r.cpuPct, float64(r.rssAnon)/(1<<20), float64(r.rssTotal)/(1<<20), r.goHeap/(1<<20), r.latMedian, r.latMax, r.unattached, r.ooms)
	return r
}

// cpuTicks is utime+stime of pid in USER_HZ ticks (/proc/PID/stat fields
// 14 and 15, counted after the parenthesised comm).
func cpuTicks(b *testing.B, pid int) uint64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatalf("the agent is gone: %v", err)
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// f[0] is field 3 (state): utime is field 14, stime 15.
	u, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return u + st
}

// rss returns RssAnon and VmRSS of pid in bytes.
func rss(b *testing.B, pid int) (anon, total uint64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatalf("the agent is gone: %v", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "RssAnon:":
			anon = kb << 10
		case "VmRSS:":
			total = kb << 10
		}
	}
	return anon, total
}

// scrape reads /metrics as Prometheus would and returns the agent's Go
// heap in use and the OOM kills it has seen on the node (other work on the
// machine, e.g. OOM tests, causes them: each costs the agent a report).
func scrape(b *testing.B, addr string) (heap, ooms float64) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		b.Logf("scrape: %v", err)
		return 0, 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "go_memstats_heap_inuse_bytes "); ok {
			heap, _ = strconv.ParseFloat(v, 64)
		}
		if strings.HasPrefix(line, "memprof_oom_kills_total{") {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			ooms += v
		}
	}
	return heap, ooms
}
