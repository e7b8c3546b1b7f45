// Event-driven discovery: the kernel's cgroup events (internal/procwatch,
// through the recording session) run discovery as soon as a container's
// cgroup is made or removed, so a container started while the agent runs
// is attached within milliseconds instead of at the next periodic listing,
// which stays as a slow safety net.

package agent

import (
	"context"
	"strings"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/procwatch"
)

// Discovery intervals: the periodic listing when cgroup events wake
// discovery (a safety net: events lost, names that come late), and when
// they cannot (the process connector has no cgroup events).
const (
	discoverSafetyNet = 30 * time.Second
	discoverPolling   = 5 * time.Second
	// discoverMinGap: discoveries woken by events are at least this far
	// apart, so a burst of cgroup events (a node starting many pods)
	// costs one listing per gap, not one per event.
	discoverMinGap = 50 * time.Millisecond
)

// discoverLoop runs discovery now, then whenever an event wakes it (at
// once, or discoverMinGap after the last discovery if that was sooner) and
// every DiscoverInterval.
func (a *Agent) discoverLoop(ctx context.Context, src procwatch.Source) {
	every := a.cfg.DiscoverInterval
	if every <= 0 {
		every = discoverPolling
		if src == procwatch.SourceBPF {
			every = discoverSafetyNet
		}
	}
	a.cfg.Logf("memprof agent: process events from %s; pods listed again every %s%s", orNone(src), every,
		map[bool]string{true: " and at once when a cgroup is made or removed", false: ""}[src == procwatch.SourceBPF])
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		a.discover(ctx)
		last := time.Now()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.wake:
			if d := discoverMinGap - time.Since(last); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			}
		}
	}
}

func orNone(s procwatch.Source) string {
	if s == "" {
		return "nowhere (polling)"
	}
	return string(s)
}

// onCgroupEvent is the session's Options.CgroupEvents: a container's
// cgroup made or removed (its path as the kubelet lays it out, see
// podfind.ParseCgroupPath, and not one of its sub-cgroups; a path too long
// to tell counts: containerDirEvent), or an exec or a
// process moved into the cgroup of a container known without names yet
// (CRI or the pod logs name it once it starts), wakes discovery. The rest
// of the node's cgroup churn (systemd units, other tests) does not. It
// runs on the events' reader: it only signals.
func (a *Agent) onCgroupEvent(e procwatch.Event) {
	switch e.Kind {
	case procwatch.CgroupMkdir, procwatch.CgroupRmdir:
		if !containerDirEvent(e.Path) {
			return
		}
	case procwatch.Exec, procwatch.CgroupAttach:
		u := a.unnamed.Load()
		if u == nil {
			return
		}
		if in := (e.Memcg != 0 && (*u)[e.Memcg]) || (e.Cgroup != 0 && (*u)[e.Cgroup]); !in {
			return
		}
	default:
		return
	}
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// containerDirEvent tells whether the mkdir or rmdir of cgroup path p can
// change the node's containers: p is a container's own cgroup, or p was cut
// (procwatch.PathMax) before it could be told. A sub-cgroup below a
// container (systemd or a runtime inside it, or a tenant with a delegated
// cgroup making and removing them in a loop) cannot: discovery counts it as
// its container's (podfind.ParseCgroupPath), so it must not wake discovery
// (each listing walks the node's whole cgroup tree). Its parent, the last
// component dropped (which may be the cut one), is then at or below a
// container already.
func containerDirEvent(p string) bool {
	if i := strings.LastIndexByte(p, '/'); i > 0 {
		if _, _, _, _, nested := podfind.ParseCgroupPath(p[:i]); nested {
			return false
		}
	}
	_, _, _, _, ok := podfind.ParseCgroupPath(p)
	return ok || len(p) >= procwatch.PathMax
}

// noteUnnamedLocked records the cgroup ids of the known containers that
// have no namespace yet (a.mu held).
func (a *Agent) noteUnnamedLocked() {
	u := map[uint64]bool{}
	for _, c := range a.known {
		if c.labels.Namespace != "" {
			continue
		}
		if c.memcg != 0 {
			u[c.memcg] = true
		}
		if c.cgv2 != 0 {
			u[c.cgv2] = true
		}
	}
	a.unnamed.Store(&u)
}
