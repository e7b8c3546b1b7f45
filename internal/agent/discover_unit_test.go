package agent

import (
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/procwatch"
)

// TestOnCgroupEventWakes: which events wake discovery (no root needed).
func TestOnCgroupEventWakes(t *testing.T) {
	a := &Agent{wake: make(chan struct{}, 1)}
	u := map[uint64]bool{7: true}
	a.unnamed.Store(&u)
	ctr := "/kubepods/besteffort/pod0bade678-9231-4d03-a33e-a129bf63aaaa/" + strings.Repeat("ab", 32)
	sysd := "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0bade678_9231_4d03_a33e_a129bf63aaaa.slice/cri-containerd-" + strings.Repeat("cd", 32) + ".scope"
	for _, c := range []struct {
		e    procwatch.Event
		wake bool
	}{
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: ctr}, true},
		{procwatch.Event{Kind: procwatch.CgroupRmdir, Path: ctr}, true},
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: "/prefix" + sysd}, true},
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: "/kubepods/besteffort/pod0bade678-9231-4d03-a33e-a129bf63aaaa"}, false}, // a pod, no container yet
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: "/system.slice/ssh.service"}, false},
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: strings.Repeat("x", procwatch.PathMax)}, true}, // cut: cannot tell
		// A container's own sub-cgroups (systemd or a runtime inside it, or a
		// tenant churning them) do not change the node's containers: no wake.
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: ctr + "/sub"}, false},
		{procwatch.Event{Kind: procwatch.CgroupRmdir, Path: ctr + "/sub/deeper"}, false},
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: "/prefix" + sysd + "/init.scope"}, false},
		// ... nor when the path is cut below the container.
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: (ctr + "/" + strings.Repeat("y", procwatch.PathMax))[:procwatch.PathMax]}, false},
		// A path cut inside the container's own name still cannot be told.
		{procwatch.Event{Kind: procwatch.CgroupMkdir, Path: (strings.Repeat("/p", 100) + ctr)[:procwatch.PathMax]}, true},
		{procwatch.Event{Kind: procwatch.Exec, Memcg: 7}, true},
		{procwatch.Event{Kind: procwatch.CgroupAttach, Cgroup: 7}, true},
		{procwatch.Event{Kind: procwatch.Exec, Memcg: 8, Cgroup: 9}, false},
		{procwatch.Event{Kind: procwatch.Exec}, false},
		{procwatch.Event{Kind: procwatch.Fork, Memcg: 7}, false},
	} {
		a.onCgroupEvent(c.e)
		woke := false
		select {
		case <-a.wake:
			woke = true
		default:
		}
		if woke != c.wake {
			t.Errorf("%v %q memcg %d cgroup %d: woke %v, want %v", c.e.Kind, c.e.Path, c.e.Memcg, c.e.Cgroup, woke, c.wake)
		}
	}
}
