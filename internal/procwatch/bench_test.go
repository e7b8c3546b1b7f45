package procwatch

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// floodResult is what one run of testdata/fork_flood showed.
type floodResult struct {
	forks          int           // the children forked (the program's count: the truth)
	wall           time.Duration // how long it forked
	forkEv, exitEv int           // their fork and exit events delivered
	execEv         int           // their exec events delivered (with exe)
	lost           uint64        // drops counted during the run
	cpu            time.Duration // this process's CPU (user + system) from the start of the flood until its events were read
	reads          int           // Reads that returned events (each at most one wakeup)
	// tail: from the flood's end (its DONE line read) to the Read that
	// returned the last of its events (0 if that came before).
	tail time.Duration
}

// cpuRate is the reader's CPU as a fraction of one core over the flood.
func (r floodResult) cpuRate() float64 { return r.cpu.Seconds() / r.wall.Seconds() }

func (r floodResult) String() string {
	ex := ""
	if r.execEv > 0 {
		ex = fmt.Sprintf(" (and %d exec events)", r.execEv)
	}
	return fmt.Sprintf("%d forks in %v (%.0f/s): %d fork + %d exit events of %d delivered%s, %d dropped (counted); reader CPU %v = %.1f%% of a core, %.2f µs per event; %d reads with events (%.0f/s); last event read %v after the flood's end",
		r.forks, r.wall.Round(time.Millisecond), float64(r.forks)/r.wall.Seconds(), r.forkEv, r.exitEv, 2*r.forks, ex, r.lost,
		r.cpu.Round(time.Millisecond), 100*r.cpuRate(), float64(r.cpu.Microseconds())/float64(max(1, r.forkEv+r.exitEv)),
		r.reads, float64(r.reads)/r.wall.Seconds(), r.tail.Round(time.Microsecond))
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runFlood reads w while bin (testdata/fork_flood) forks for ms
// milliseconds at rate forks/s (0: as fast as it can) in a v2 cgroup of its
// own, and counts the fork and exit events of its children (forks by its
// pid; exits in its cgroup but not its own), and their execs of exe (""
// none: the children exit at once). It waits up to 2 s after the flood for
// the events still in flight.
func runFlood(tb testing.TB, w *Watcher, bin string, ms, rate int, exe string) floodResult {
	tb.Helper()
	defer w.Close()
	cg := kube.MkCgroup(tb, v2Root, fmt.Sprintf("memprof-pwflood-%d", os.Getpid()))
	defer kube.RmCgroup(tb, cg)
	cgID, err := cgroups.ID(cg)
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(bin, strconv.Itoa(ms), strconv.Itoa(rate), filepath.Join(cg, "cgroup.procs"))
	cmd.Stderr = os.Stderr
	if exe != "" {
		cmd.Env = append(os.Environ(), "FORK_FLOOD_EXEC="+exe)
	}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	pid := cmd.Process.Pid
	out := bufio.NewReader(stdout)
	if l, _ := out.ReadString('\n'); l != "READY\n" {
		tb.Fatalf("fork_flood: %q", l)
	}

	var forkEv, exitEv, execEv, reads, lastAt atomic.Int64
	done := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(done)
		for {
			evs, err := w.Read()
			select {
			case <-stop:
				return
			default:
			}
			if err != nil {
				if errors.Is(err, ErrOverrun) {
					continue
				}
				return
			}
			reads.Add(1)
			for _, e := range evs {
				switch {
				case e.Kind == Fork && e.ParentTgid == pid:
					forkEv.Add(1)
					lastAt.Store(time.Now().UnixNano())
				case e.Kind == Exit && e.Cgroup == cgID && e.Tgid != pid:
					exitEv.Add(1)
					lastAt.Store(time.Now().UnixNano())
				case e.Kind == Exec && e.Cgroup == cgID && e.Tgid != pid:
					execEv.Add(1)
				}
			}
		}
	}()
	lost0 := w.Lost()
	time.Sleep(50 * time.Millisecond) // the reader settles (blocked in Read)
	reads.Store(0)
	c0 := cpuTime()
	fmt.Fprintln(stdin, "go")
	l, _ := out.ReadString('\n')
	doneAt := time.Now()
	m := regexp.MustCompile(`^DONE forks=([0-9]+) ms=([0-9]+)`).FindStringSubmatch(l)
	if m == nil {
		tb.Fatalf("fork_flood: %q", l)
	}
	forks, _ := strconv.Atoi(m[1])
	wallMs, _ := strconv.Atoi(m[2])
	lostNow := func() int64 { return int64(w.Lost() - lost0) }
	deadline := time.Now().Add(2 * time.Second)
	for forkEv.Load()+exitEv.Load()+lostNow() < int64(2*forks) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	r := floodResult{
		forks: forks, wall: time.Duration(wallMs) * time.Millisecond,
		forkEv: int(forkEv.Load()), exitEv: int(exitEv.Load()), execEv: int(execEv.Load()), lost: uint64(lostNow()),
		cpu: cpuTime() - c0, reads: int(reads.Load()),
		tail: max(0, time.Unix(0, lastAt.Load()).Sub(doneAt)),
	}
	close(stop)
	w.Close()
	<-done
	io.Copy(io.Discard, out)
	return r
}

// latencies is the delay from each event to its Read (Event.Time to the
// Read's return, CLOCK_BOOTTIME), sorted.
type latencies []time.Duration

func (l latencies) String() string {
	if len(l) == 0 {
		return "none"
	}
	return fmt.Sprintf("%d events: median %v, p99 %v, max %v", len(l), l[len(l)/2], l[len(l)*99/100], l[len(l)-1])
}

// idleLatency reads w while this process runs n children that exec
// /bin/true and makes n v2 cgroups, one every gap, and returns the delay of
// the children's exec events and of the cgroups' mkdir events.
func idleLatency(tb testing.TB, w *Watcher, n int, gap time.Duration) (execLat, mkdirLat latencies) {
	tb.Helper()
	defer w.Close()
	type seen struct {
		e   Event
		lat time.Duration
	}
	var mu sync.Mutex
	var all []seen
	done := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(done)
		for {
			evs, err := w.Read()
			now := bootNs()
			select {
			case <-stop:
				return
			default:
			}
			if errors.Is(err, ErrOverrun) {
				continue
			}
			if err != nil {
				return
			}
			mu.Lock()
			for _, e := range evs {
				if e.Kind == Exec || e.Kind == CgroupMkdir {
					all = append(all, seen{e, time.Duration(now - e.Time)})
				}
			}
			mu.Unlock()
		}
	}()
	defer func() { close(stop); w.Close(); <-done }()
	pids := map[int]bool{}
	paths := map[string]bool{}
	base := fmt.Sprintf("memprof-pwlat-%d", os.Getpid())
	root := kube.MkCgroup(tb, v2Root, base)
	defer kube.RmCgroup(tb, root)
	for i := 0; i < n; i++ {
		cmd := exec.Command("/bin/true")
		if err := cmd.Run(); err != nil {
			tb.Fatal(err)
		}
		pids[cmd.Process.Pid] = true
		time.Sleep(gap / 2)
		name := fmt.Sprintf("c%d", i)
		if err := os.Mkdir(filepath.Join(root, name), 0o755); err != nil {
			tb.Fatal(err)
		}
		defer os.Remove(filepath.Join(root, name))
		paths["/"+base+"/"+name] = true
		time.Sleep(gap / 2)
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		execLat, mkdirLat = nil, nil
		for _, s := range all {
			switch {
			case s.e.Kind == Exec && pids[s.e.Tgid]:
				execLat = append(execLat, s.lat)
			case s.e.Kind == CgroupMkdir && paths[s.e.Path]:
				mkdirLat = append(mkdirLat, s.lat)
			}
		}
		mu.Unlock()
		if len(execLat) >= n && len(mkdirLat) >= n {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	slices.Sort(execLat)
	slices.Sort(mkdirLat)
	return execLat, mkdirLat
}

// BenchmarkForkFlood: the reader's CPU while a tenant forks children that
// exit at once (testdata/fork_flood, 3 s as fast as it can, then 3 s at
// 1000 forks/s, then 3 s of children that exec /bin/true as fast as it
// can, less the reader's CPU in 3 s at 1 fork/s: the host's other
// events), its events delivered and dropped, and the delay of exec and
// cgroup mkdir events at idle (100 of each, 20 ms apart), with every event
// waking the reader (eager: as before batching) and with batched wakeups
// (the default).
func BenchmarkForkFlood(b *testing.B) {
	testprog.RequireRoot(b)
	bin := testprog.Build(b, "fork_flood.c", "-O2")
	for _, m := range []struct {
		name string
		wake wakePolicy
	}{{"eager", eagerWake}, {"batched", defaultWake}} {
		open := func() *Watcher {
			src, err := openBPF(0, m.wake)
			if err != nil {
				b.Fatal(err)
			}
			return &Watcher{src: src, kind: SourceBPF}
		}
		// The host's own events (other processes, other tests) are read
		// too: a run at 1 fork/s measures them, and is taken off.
		base := runFlood(b, open(), bin, 3000, 1, "")
		fmt.Printf("%-7s baseline (rate 1/s): %v\n", m.name, base)
		for _, f := range []struct {
			rate int
			exe  string
		}{{0, ""}, {1000, ""}, {0, "/bin/true"}} {
			r := runFlood(b, open(), bin, 3000, f.rate, f.exe)
			what := "fork+exit"
			if f.exe != "" {
				what = "fork+exec+exit"
			}
			fmt.Printf("%-7s %s flood (rate %d/s): %v\n", m.name, what, f.rate, r)
			extra := r.cpuRate() - base.cpuRate()
			perEv := extra * r.wall.Seconds() * 1e6 / float64(max(1, r.forkEv+r.exitEv+r.execEv))
			fmt.Printf("%-7s   the flood's cost: %.2f%% of a core, %.2f µs per event of the flood\n", m.name, 100*extra, perEv)
			if f.exe == "" {
				b.ReportMetric(100*extra, fmt.Sprintf("%s-%%core@%d/s", m.name, f.rate))
				b.ReportMetric(perEv, fmt.Sprintf("%s-µs/event@%d/s", m.name, f.rate))
			} else {
				b.ReportMetric(100*extra, fmt.Sprintf("%s-exec-%%core@%d/s", m.name, f.rate))
			}
		}
		ex, mk := idleLatency(b, open(), 100, 20*time.Millisecond)
		fmt.Printf("%-7s idle: exec %v; cgroup mkdir %v\n", m.name, ex, mk)
	}
	b.ReportMetric(0, "ns/op")
}
