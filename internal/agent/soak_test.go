package agent

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/internal/testprog"
)

const v1Memory = "/sys/fs/cgroup/memory"

// proc is a process started by a test and moved into a container cgroup.
type proc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *syncBuf
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startIn starts a command that waits for a line on stdin (sh's read, then
// exec), moves it into the cgroup dir, and returns it; the caller writes the
// line when the agent is attached. It is killed when the test ends.
func startIn(t *testing.T, dir string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", "read x; exec \"$0\" \"$@\"", args[0])
	cmd.Args = append(cmd.Args, args[1:]...)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, stdin: in, out: &syncBuf{}}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("move %d into %s: %v", cmd.Process.Pid, dir, err)
	}
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *proc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Kill()
		p.cmd.Wait()
	}
}

// fakePod creates a kubelet-style container cgroup (cgroupfs, BestEffort)
// under root in the v1 memory hierarchy and the pod's log directory.
func fakePod(t *testing.T, fsRoot, logs, ns, name, ctrName string) (dir string) {
	t.Helper()
	uid := newUID()
	dir = mkCgroup(t, v1Memory, fsRoot+"/kubepods/besteffort/pod"+uid+"/"+randHex(64))
	writeFile(t, filepath.Join(logs, ns+"_"+name+"_"+uid, ctrName, "0.log"), "")
	return dir
}

func mapEntries(a *Agent) map[string]int {
	out := map[string]int{}
	for _, m := range a.s.MapStats() {
		out[m.Name] = m.Entries
	}
	return out
}

// TestAgentSoak: many short-lived processes and a few containers come and
// go; the agent follows them, its own Go heap stays bounded (no growth
// from one soak round to the next) and the BPF map
// entries of dead processes are reclaimed (back to the baseline).
func TestAgentSoak(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	fsRoot := "memprof-soak-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mps-" + randHex(6)
	var attached atomic.Int64
	cfg := Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		ProfileInterval:  time.Second,
		SampleRate:       16 << 10,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
	}
	cfg.Logf = func(f string, args ...any) {
		msg := fmt.Sprintf(f, args...)
		if strings.Contains(msg, "attached to process") && strings.Contains(msg, "agent_workload") {
			attached.Add(1)
		}
		if !strings.Contains(msg, "attached to process") && !strings.Contains(msg, "exited; its heap") {
			t.Log(msg)
		}
	}
	a, _, _ := startAgent(t, cfg)
	time.Sleep(time.Second)
	base := mapEntries(a)
	t.Logf("baseline: BPF map entries %v", base)

	// round runs one churn pod with children short-lived processes and
	// containers short containers that come and go, and waits until the
	// agent has dropped them all.
	round := func(r, children, containers int) {
		attached.Store(0)
		churnDir := fakePod(t, fsRoot, logs, ns, fmt.Sprintf("churn-%d", r), "work")
		churn := startIn(t, churnDir, bin, "spawn", strconv.Itoa(children), "400", strconv.Itoa(1<<20))
		waitFor(t, 15*time.Second, "the agent to profile the churn pod", func() bool {
			c := findContainer(a, ns, fmt.Sprintf("churn-%d", r))
			return c != nil && c.Processes >= 1
		})
		start := time.Now()
		fmt.Fprintln(churn.stdin, "go")
		for i := 0; i < containers; i++ {
			name := fmt.Sprintf("short-%d-%d", r, i)
			dir := fakePod(t, fsRoot, logs, ns, name, "app")
			p := startIn(t, dir, bin, "leak", strconv.Itoa(4<<20), strconv.Itoa(64<<10))
			fmt.Fprintln(p.stdin, "go")
			waitFor(t, 15*time.Second, "the agent to profile "+name, func() bool {
				c := findContainer(a, ns, name)
				return c != nil && c.Processes >= 1 && strings.Contains(p.out.String(), "waiting")
			})
			p.cmd.Process.Signal(syscall.SIGUSR1)
			waitFor(t, 10*time.Second, name+" to leak", func() bool { return strings.Contains(p.out.String(), "leaked") })
			waitFor(t, 10*time.Second, "the live heap of "+name, func() bool {
				c := findContainer(a, ns, name)
				return c != nil && c.LiveHeap > 2<<20
			})
			p.kill()
			rmCgroup(t, dir) // the container goes: kubelet removes its cgroup
			waitFor(t, 10*time.Second, "the agent to drop "+name, func() bool { return findContainer(a, ns, name) == nil })
		}
		waitFor(t, 60*time.Second, "the churn to finish", func() bool { return strings.Contains(churn.out.String(), "done") })
		t.Logf("round %d: %d short-lived processes over %s, %d attach notifications for agent_workload processes; %d containers came and went",
			r, children, time.Since(start).Round(time.Millisecond), attached.Load(), containers)
		// (not in the warm-up round: the first attach to a binary and libc
		// parses their symbols, slow under the race detector)
		if n := attached.Load(); r > 0 && n < int64(children/2) {
			t.Errorf("the agent attached to %d processes, want at least %d of the %d short-lived ones", n, children/2, children)
		}
		churn.kill()
		rmCgroup(t, churnDir)
		waitFor(t, 10*time.Second, "the agent to drop every container and process", func() bool {
			return len(a.Containers()) == 0 && a.TargetCount() == 0
		})
		// The RSS tier reclaims exited processes told by process events
		// every 2 s (reclaimEvery), any other at its full re-listing
		// (rssPoll): the heap is compared once it has.
		if rs, ok := a.rssTier().s.(*rss.Session); ok {
			t0 := time.Now()
			waitFor(t, rssPoll+5*time.Second, "the RSS tier to reclaim every exited process", func() bool { return rs.ProcessCount() == 0 })
			t.Logf("round %d: the RSS tier reclaimed its exited processes within %s", r, time.Since(t0).Round(100*time.Millisecond))
		}
	}
	var ms runtime.MemStats
	heap := func() uint64 {
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	heapStart := heap()
	round(0, 20, 1) // warm-up: symbol caches of the binary and libc fill once
	heapWarm := heap()
	// A first soak round: some state is made once, at its first use
	// (profile buffers, caches that fill over several profile intervals):
	// measured 10.5 or 19.7 MiB after the warm-up, 19.7 MiB after each
	// soak round. Growth is judged between two equal soak rounds.
	round(1, 80, 4)
	heapSoak1 := heap()
	round(2, 80, 4)
	var final map[string]int
	deadline := time.Now().Add(5 * time.Second)
	for {
		final = mapEntries(a)
		if final["live"] <= base["live"] && final["allocs"] <= base["allocs"] && final["proc_calls"] <= base["proc_calls"] {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("BPF map entries of dead processes not reclaimed: %v, baseline %v", final, base)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	heapEnd := heap()
	t.Logf("after: BPF map entries %v (stacks are shared, not per process); agent Go heap %.1f MiB at start, %.1f MiB after the warm-up round, %.1f and %.1f MiB after the two soak rounds",
		final, float64(heapStart)/(1<<20), float64(heapWarm)/(1<<20), float64(heapSoak1)/(1<<20), float64(heapEnd)/(1<<20))
	if grow := int64(heapEnd) - int64(heapSoak1); grow > 4<<20 {
		t.Errorf("agent Go heap grew by %.1f MiB over the second soak round (80 processes, 4 containers), want < 4 MiB", float64(grow)/(1<<20))
	}
}

// TestAgentBudget: a process above --max-calls-per-second is detached and
// reported, stays detached, and the rest of its container is still profiled.
func TestAgentBudget(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	fsRoot := "memprof-budget-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpq-" + randHex(6)
	const budget = 20000
	a, _, stop := startAgent(t, Config{
		Paths:             podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:        []string{ns},
		MaxCallsPerSecond: budget,
		DiscoverInterval:  300 * time.Millisecond,
		CollectInterval:   500 * time.Millisecond,
	})
	dir := fakePod(t, fsRoot, logs, ns, "hot", "app")
	hot := startIn(t, dir, bin, "hot")
	waitFor(t, 15*time.Second, "the agent to profile the hot pod", func() bool {
		c := findContainer(a, ns, "hot")
		return c != nil && c.Processes >= 1
	})
	fmt.Fprintln(hot.stdin, "go")
	pid := hot.cmd.Process.Pid
	t0 := time.Now()
	waitFor(t, 10*time.Second, "the budget to detach the hot process", func() bool {
		c := findContainer(a, ns, "hot")
		return c != nil && len(c.Detached) == 1 && c.Detached[0] == pid
	})
	t.Logf("hot process %d detached %s after it started its loop", pid, time.Since(t0).Round(time.Millisecond))
	_, b := get(t, "http://"+a.Addr()+"/metrics", "")
	if v, ok := metric(string(b), MetricBudgetCont, map[string]string{"namespace": ns, "pod": "hot", "container": "app"}); !ok || v != 1 {
		t.Errorf("%s{pod=hot} = %v (present %t), want 1", MetricBudgetCont, v, ok)
	}
	// it keeps running, unprofiled, and is not re-attached
	time.Sleep(1500 * time.Millisecond)
	if syscall.Kill(pid, 0) != nil {
		t.Fatalf("the hot process died: the budget must detach, not kill")
	}
	if _, ok := a.s.Targets()[pid]; ok {
		t.Errorf("hot process %d re-attached after the budget detached it", pid)
	}
	calls, _ := a.s.ProcCalls()
	c1 := calls[uint32(pid)]
	time.Sleep(500 * time.Millisecond)
	calls, _ = a.s.ProcCalls()
	if c2 := calls[uint32(pid)]; c2 != c1 {
		t.Errorf("probe hits of the detached process still counted: %d -> %d", c1, c2)
	}
	// a new process of the same container is still profiled
	other := startIn(t, dir, bin, "leak", strconv.Itoa(2<<20), strconv.Itoa(64<<10))
	fmt.Fprintln(other.stdin, "go")
	waitFor(t, 10*time.Second, "the agent to attach to the container's new process", func() bool {
		_, ok := a.s.Targets()[other.cmd.Process.Pid]
		return ok
	})
	// graceful shutdown (SIGTERM) detaches everything: no BPF object is
	// left open, and the processes keep running
	stop()
	if n := bpfFDs(); n != 0 {
		t.Errorf("%d BPF maps/programs/links still open after the agent stopped", n)
	}
	if syscall.Kill(pid, 0) != nil || syscall.Kill(other.cmd.Process.Pid, 0) != nil {
		t.Errorf("a target died when the agent stopped")
	}
	hot.kill()
	other.kill()
}
