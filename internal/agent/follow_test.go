package agent

import (
	"bufio"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
)

// TestAgentFollowsContainers: a container started while the agent runs is
// found and profiled from the moment it is attached on (at rate 1 its live
// heap is exactly the workload's last 256 blocks), and when its process
// exits, then its cgroup goes, the agent forgets the process and the
// container.
func TestAgentFollowsContainers(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	fsRoot := "memprof-follow-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpf-" + randHex(6)
	a, _, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		SampleRate:       1,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  300 * time.Millisecond,
	})

	dir := fakePod(t, fsRoot, logs, ns, "late", "app")
	// The workload joins the container's cgroup itself, then allocates
	// 200 blocks/s of 64<<(n%6) bytes, keeping the last 256.
	cmd := exec.Command(bin, "trickle", filepath.Join(dir, "cgroup.procs"), "200")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	var joinNS int64
	if _, err := fmt.Sscanf(line, "joined %d", &joinNS); err != nil {
		t.Fatalf("workload said %q: %v", line, err)
	}
	pid := cmd.Process.Pid
	waitFor(t, 15*time.Second, "the agent to attach to the new container", func() bool {
		_, ok := a.s.Targets()[pid]
		return ok
	})
	lat := time.Since(time.Unix(0, joinNS))
	t.Logf("process %d attached %s after it joined its container (discovery every 300 ms)", pid, lat.Round(time.Millisecond))
	// Bound: one discovery and one rescan period, attach, and slack for
	// a loaded machine.
	if lat > 5*time.Second {
		t.Errorf("attached %s after the container started, want < 5s", lat)
	}

	// Truth: 256 consecutive blocks of 64<<(n%6) bytes are 42 whole
	// cycles of 4032 bytes plus 4 blocks, 960..3648 bytes by phase. The
	// 256 live after 1.3 s of allocations (200/s) were all allocated
	// while attached; nothing else in the process allocates.
	const lo, hi = 42*4032 + 960, 42*4032 + 3648
	var live float64
	waitFor(t, 15*time.Second, "the live heap of the 256 blocks", func() bool {
		c := findContainer(a, ns, "late")
		if c == nil {
			return false
		}
		live = c.LiveHeap
		return live >= lo && live <= hi
	})
	t.Logf("live heap %.0f bytes, truth %d..%d (rate 1: exact)", live, lo, hi)

	// The process exits; the container (its cgroup) stays for now.
	cmd.Process.Kill()
	cmd.Wait()
	waitFor(t, 10*time.Second, "the agent to forget the exited process and its BPF call counter", func() bool {
		_, ok := a.s.Targets()[pid]
		c := findContainer(a, ns, "late")
		calls, err := a.s.ProcCalls()
		if err != nil {
			t.Fatal(err)
		}
		_, counted := calls[uint32(pid)]
		return !ok && !counted && c != nil && c.Processes == 0 && c.LiveHeap == 0
	})
	// The container goes.
	rmCgroup(t, dir)
	waitFor(t, 15*time.Second, "the agent to forget the removed container", func() bool {
		return findContainer(a, ns, "late") == nil
	})
}
