package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/pprofout"
)

// pidListRefresh bounds how long a container's process list (the pids of
// /containers, and which container a sampled pid belongs to) may go
// unread when no target attaches or exits.
const pidListRefresh = 30 * time.Second

// figuresEvery is how often collect computes the per-container figures
// (live heap, allocations) when nothing reads them: a scrape or a
// /containers request computes them when they are older than the
// collection interval (freshFigures). Each computation reads every sampled
// block and bucket of the BPF maps, whose cost grows with their capacity.
const figuresEvery = 15 * time.Second

// collect enforces the overhead budget and, every figuresEvery, computes
// the per-container figures from one snapshot of the sampled state. The
// containers' process lists are re-read only when the session's targets
// changed (a process attached or exited) or pidListRefresh passed, not at
// every collection; the RSS of the containers is read at scrape time
// (metrics.go).
func (a *Agent) collect(ctx context.Context) {
	a.figMu.Lock()
	defer a.figMu.Unlock()
	a.collectLocked(ctx, false)
}

// freshFigures computes the per-container figures now if they are older
// than the collection interval (a scrape, /containers).
func (a *Agent) freshFigures() {
	a.mu.Lock()
	ready := a.s != nil
	a.mu.Unlock()
	if !ready {
		return
	}
	a.figMu.Lock()
	defer a.figMu.Unlock()
	if time.Since(a.lastFigures) > a.cfg.CollectInterval {
		a.collectLocked(context.Background(), true)
	}
}

// collectLocked is collect with figMu held; figures: compute them whatever
// their age.
func (a *Agent) collectLocked(ctx context.Context, figures bool) {
	if ctx.Err() != nil {
		return
	}
	conts := a.profiledList()
	targets := a.s.Targets()
	now := time.Now()
	a.mu.Lock()
	reread := now.Sub(a.lastPidList) > pidListRefresh || len(targets) != len(a.lastTargets)
	for pid := range targets {
		if !a.lastTargets[pid] {
			reread = true
			break
		}
	}
	for _, c := range conts {
		if !c.pidsRead {
			reread = true
		}
	}
	if reread {
		a.lastTargets = make(map[int]bool, len(targets))
		for pid := range targets {
			a.lastTargets[pid] = true
		}
		a.lastPidList = now
	}
	a.mu.Unlock()
	pidOf := map[uint32]*container{}
	for _, c := range conts {
		if reread {
			pids, err := cgroups.Procs(c.dir, true)
			if err != nil {
				pids = nil
			}
			a.mu.Lock()
			c.pids, c.pidsRead = pids, true
			a.mu.Unlock()
		}
		a.mu.Lock()
		for _, p := range c.pids {
			pidOf[uint32(p)] = c
		}
		a.mu.Unlock()
	}

	a.budget(now, pidOf)
	if !figures && now.Sub(a.lastFigures) < figuresEvery {
		return
	}
	a.lastFigures = now

	snap, err := a.s.Counts()
	if err != nil {
		a.cfg.Log.Error("read sampled state", "err", err)
		return
	}
	live := map[*container]float64{}
	alloc := map[*container]map[uint32]float64{}
	procs := map[*container]int{}
	for pid := range targets {
		if c := pidOf[uint32(pid)]; c != nil {
			procs[c]++
		}
	}
	for _, b := range snap.Buckets {
		c := pidOf[b.Pid]
		if c == nil {
			continue
		}
		_, inuse := pprofout.Unsample(b.InuseCount, b.Size, a.cfg.SampleRate)
		_, allocd := pprofout.Unsample(b.AllocCount, b.Size, a.cfg.SampleRate)
		live[c] += float64(inuse)
		if alloc[c] == nil {
			alloc[c] = map[uint32]float64{}
		}
		alloc[c][b.Pid] += float64(allocd)
	}

	a.mu.Lock()
	dt := now.Sub(a.lastTick).Seconds()
	a.lastTick = now
	a.mu.Unlock()
	for _, c := range conts {
		a.mu.Lock()
		c.live = live[c]
		c.procs = procs[c]
		cur := alloc[c]
		for pid, v := range c.allocCum {
			if _, ok := cur[pid]; !ok {
				c.retired += v // process gone: its state was dropped
				delete(c.allocCum, pid)
			}
		}
		total := c.retired
		for pid, v := range cur {
			if old := c.allocCum[pid]; v < old {
				v = old // never decreases while the process lives
			}
			c.allocCum[pid] = v
			total += v
		}
		if dt > 0 && c.allocTot > 0 {
			c.allocRate = max(total-c.allocTot, 0) / dt
		}
		c.allocTot = total
		a.mu.Unlock()
	}
}

// budget detaches target processes making more allocator calls per second
// than the budget, and keeps the probe-hit rate.
func (a *Agent) budget(now time.Time, pidOf map[uint32]*container) {
	calls, err := a.s.ProcCalls()
	if err != nil {
		return
	}
	ctr, cerr := a.s.Counters()
	a.mu.Lock()
	dt := now.Sub(a.lastBudget).Seconds()
	a.lastBudget = now
	if cerr == nil {
		if dt > 0 && ctr.Calls >= a.lastTotal && a.lastTotal > 0 {
			a.probeRate = float64(ctr.Calls-a.lastTotal) / dt
		}
		a.lastTotal = ctr.Calls
		a.probeTotal = ctr.Calls
	}
	var over []uint32
	for pid, n := range calls {
		prev, ok := a.lastCalls[pid]
		if ok && dt > 0 && n >= prev && a.cfg.MaxCallsPerSecond > 0 {
			if rate := float64(n-prev) / dt; rate > a.cfg.MaxCallsPerSecond {
				over = append(over, pid)
				a.cfg.Log.Warn("process above the overhead budget: detached, no longer profiled", "pid", pid, "calls_per_second", int64(rate), "budget", a.cfg.MaxCallsPerSecond)
			}
		}
	}
	// Keep only the pids the map still has (bounded by the map's size).
	a.lastCalls = calls
	a.mu.Unlock()
	for _, pid := range over {
		c := pidOf[pid]
		a.mu.Lock()
		a.budgetAll++
		if c != nil {
			a.budgetHits[c.labels]++
			c.excluded[int(pid)] = true
		}
		delete(a.lastCalls, pid)
		a.mu.Unlock()
		a.s.Exclude(int(pid), fmt.Sprintf("above the budget of %.0f allocator calls/s", a.cfg.MaxCallsPerSecond))
	}
	// Detached processes that are gone leave the container's list.
	a.mu.Lock()
	for _, c := range a.profiled {
		for pid := range c.excluded {
			if !procmaps.Alive(pid) {
				delete(c.excluded, pid)
			}
		}
	}
	a.mu.Unlock()
}
