package agent

import (
	"bytes"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// TestAgentHostileContainer: a runc container whose libc path, once the
// library is mapped, is swapped for an absolute symlink to a FIFO that
// exists only on the host. Following the symlink through /proc/PID/root
// resolves it against the agent's root: an open of that path blocked the
// agent forever (discovery stopped for every pod). The agent must attach to
// both containers, profile the good one exactly, and stay responsive and
// within its memory limit.
func TestAgentHostileContainer(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	badRoot, goodRoot := kube.Rootfs(t, bin), kube.Rootfs(t, bin)
	fsRoot := "memprof-hostile-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mph-" + randHex(6)

	bad := kube.Pod{Namespace: ns, Name: "bad", UID: newUID()}
	good := kube.Pod{Namespace: ns, Name: "good", UID: newUID()}
	args := []string{"/agent_workload", "leak", fmt.Sprint(leakTotal), fmt.Sprint(leakBlock)}
	bc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: bad, Name: "app", Rootfs: badRoot, Logs: logs, Args: args})
	gc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: good, Name: "app", Rootfs: goodRoot, Logs: logs, Args: args})
	for _, c := range []*kube.Container{bc, gc} {
		waitFor(t, 10*time.Second, "the container to start", func() bool { return strings.Contains(c.Output(), "waiting") })
	}

	// The bad container's libc (mapped by its process) becomes an absolute
	// symlink to a host-only FIFO.
	fifo := filepath.Join(os.TempDir(), fmt.Sprintf("memprof-hostile-%d-%s.fifo", os.Getpid(), randHex(4)))
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(fifo) })
	swapped := 0
	for _, lib := range kube.Libs(t, bin) {
		if !strings.Contains(filepath.Base(lib), "libc.so") {
			continue
		}
		p := filepath.Join(badRoot, lib)
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(fifo, p); err != nil {
			t.Fatal(err)
		}
		swapped++
	}
	if swapped == 0 {
		t.Fatalf("no libc among the libraries of %s", bin)
	}

	limit := daemonSetMemoryLimit(t)
	mem := startMemWatch(t)
	a, tok, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		ProfileInterval:  time.Second,
		Retention:        time.Hour,
		SampleRate:       sampleRate,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
	})
	base := "http://" + a.Addr()

	// Responsive throughout: /healthz answers while the agent works.
	stop := make(chan struct{})
	slow := make(chan time.Duration, 1)
	go func() {
		var worst time.Duration
		defer func() { slow <- worst }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			start := time.Now()
			get(t, base+"/healthz", "")
			worst = max(worst, time.Since(start))
			mem.sample()
		}
	}()

	t0 := time.Now()
	for _, pod := range []string{"bad", "good"} {
		waitFor(t, 20*time.Second, "the agent to attach to pod "+pod, func() bool {
			c := findContainer(a, ns, pod)
			return c != nil && c.Processes >= 1
		})
	}
	t.Logf("attached to both containers %v after start", time.Since(t0).Round(time.Millisecond))

	for _, c := range []*kube.Container{bc, gc} {
		if err := syscall.Kill(c.Pid, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the container to leak", func() bool { return strings.Contains(c.Output(), "leaked") })
	}
	for _, pod := range []string{"good", "bad"} {
		q := url.Values{"namespace": {ns}, "pod": {pod}, "container": {"app"}}
		var hp *profile.Profile
		waitFor(t, 15*time.Second, "a heap profile of pod "+pod+" with the leak", func() bool {
			code, body := get(t, base+"/profiles/heap?"+q.Encode(), tok)
			if code != 200 {
				return false
			}
			p, err := profile.Parse(bytes.NewReader(body))
			if err != nil {
				return false
			}
			hp = p
			top := topOf(t, p, "inuse_space")
			return hasFrame(top, "agent_leak_known") && within(float64(top.Value), leakTotal, 0.15)
		})
		top := topOf(t, hp, "inuse_space")
		t.Logf("pod %s: top inuse %s %.1f MiB (truth %d MiB)", pod, strings.Join(top.Frames[:min(3, len(top.Frames))], " < "), float64(top.Value)/(1<<20), leakTotal>>20)
		for _, c := range hp.Comments {
			if strings.Contains(c, "error") {
				t.Logf("pod %s profile comment: %s", pod, c)
			}
		}
	}
	close(stop)
	worst := <-slow
	t.Logf("slowest /healthz answer %v", worst)
	if worst > 2*time.Second {
		t.Errorf("/healthz took %v while the agent handled the hostile container, want < 2s", worst)
	}

	// Within its memory limit: the whole test process (the agent, the test
	// and its HTTP client) at its peak RSS, plus the agent's BPF maps, fits
	// in the DaemonSet's memory limit (an over-count: RSS includes the test
	// and the mmapped ring buffers counted again as maps); and the agent's
	// Go heap stays within heapPeakMax at its peak and heapLiveMax retained.
	mem.sample()
	rss, maps := peakRSS(t), bpfMapMemory()
	peak := int64(mem.peakHeap.Load()) - int64(mem.heap0)
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	live := int64(ms.HeapAlloc) - int64(mem.live0)
	t.Logf("memory: test process peak RSS %.1f MiB + BPF maps %.1f MiB = %.1f MiB (DaemonSet limit %d MiB); Go heap in use %+.1f MiB at its peak (bound %d MiB), live after GC %+.1f MiB at the end (bound %d MiB)",
		mib(rss), mib(maps), mib(rss+maps), limit>>20, mib(peak), heapPeakMax>>20, mib(live), heapLiveMax>>20)
	if rss+maps > limit {
		t.Errorf("peak RSS %.1f MiB + BPF maps %.1f MiB exceed the DaemonSet's memory limit %d MiB", mib(rss), mib(maps), limit>>20)
	}
	if peak > heapPeakMax {
		t.Errorf("the Go heap in use grew by %.1f MiB at its peak while the agent handled the hostile container, want < %d MiB", mib(peak), heapPeakMax>>20)
	}
	if live > heapLiveMax {
		t.Errorf("the agent retains %.1f MiB of Go heap after the hostile container, want < %d MiB", mib(live), heapLiveMax>>20)
	}
	if !fifoUnopened(fifo) {
		t.Errorf("the agent opened the host FIFO %s", fifo)
	}
}

// fifoUnopened reports that no process holds fifo open (a writer open
// without a reader fails with ENXIO).
func fifoUnopened(fifo string) bool {
	fd, err := syscall.Open(fifo, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err == nil {
		syscall.Close(fd)
		return false
	}
	return err == syscall.ENXIO
}
