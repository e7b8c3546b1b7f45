package recorder

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/pprofout"
)

// FragReport is the fragmentation verdict of one process or cgroup.
type FragReport struct {
	Scope   string // "pid 1234 (redis-server)" or "cgroup /sys/fs/cgroup/..."
	Verdict frag.Verdict
	Err     error // why no verdict could be made (process gone, ...)
	// Coverage says whether the live bytes are complete ("complete: ..."
	// or "partial: ...").
	Coverage string
	// Regions is the split of anonymous RSS the verdict used (nil: the
	// whole anonymous RSS was compared).
	Regions *frag.Regions
	// Notes tell what memprof could not see (allocations through something
	// it does not probe, children not followed).
	Notes []string
	// Withheld says why the verdict is not given though the figures are
	// (the live size is known to be undercounted); Verdict then holds the
	// figures, no alarm and no advice. (Verdict.Withheld, set by
	// frag.Bounded, is the other reason: blocks predating the attach.)
	Withheld string
}

// liveUndercount names the losses that make the live size undercounted
// ("" if none): sampled blocks the live map had no room for, and calls
// whose result was never recorded.
func liveUndercount(c bpfload.Counters) string {
	var why []string
	for _, l := range []struct {
		n    uint64
		what string
	}{
		{c.LiveFull, "sampled blocks not tracked: the live-block map was full"},
		{c.MissedReturn, "allocator calls abandoned by an exception or longjmp (whether they allocated is unknown)"},
		{c.NoThreadState, "allocator calls of threads without state"},
		{c.ReadFailed, "allocations whose result could not be read"},
	} {
		if l.n > 0 {
			why = append(why, fmt.Sprintf("%d %s", l.n, l.what))
		}
	}
	return strings.Join(why, ", ")
}

// withhold turns a verdict into figures only, for the reason given.
func withhold(r *FragReport, reason string) {
	if r.Err != nil || !r.Verdict.Covered {
		return
	}
	v := &r.Verdict
	if r.Withheld != "" {
		r.Withheld += "; " + reason
	} else {
		r.Withheld = reason
	}
	v.Alarm, v.Advice = false, nil
	v.Summary = fmt.Sprintf("no verdict: the live size may be undercounted (%s); figures only: RSS %s, live (estimated) %s, ratio %.2f",
		r.Withheld, pprofout.HumanBytes(int64(v.RSS)), pprofout.HumanBytes(int64(v.Live)), v.Ratio)
	if v.Withheld != "" {
		// Bounded by coverage too (frag.Bounded): both reasons hold.
		v.Summary += "; also: " + v.Withheld
	}
}

// LiveByPid sums the unsampled inuse_space of a built profile per pid label.
func LiveByPid(p *profile.Profile) map[int]int64 {
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			idx = i
		}
	}
	out := map[int]int64{}
	if idx < 0 {
		return out
	}
	for _, s := range p.Sample {
		if v := s.Label["pid"]; len(v) == 1 {
			if pid, err := strconv.Atoi(v[0]); err == nil {
				out[pid] += s.Value[idx]
			}
		}
	}
	return out
}

// Fragmentation judges every live target, and every recorded cgroup, from
// the live bytes estimated in the built profile against the allocator's
// share of anonymous RSS (frag.Regions: brk heap, glibc arenas, mappings
// holding live blocks; not stacks nor the program's own mmap regions).
// Targets attached while running get a verdict only when it cannot depend
// on the blocks allocated before the attach (frag.Bounded). Targets that
// exited have no RSS left to judge, unless memprof started them (read in
// their exit stop).
func (s *Session) Fragmentation(built *profile.Profile) []FragReport {
	live := LiveByPid(built)
	s.mu.Lock()
	var targets, skipped []*target
	for _, t := range s.procs {
		if !t.skipped {
			targets = append(targets, t)
		} else if alive(t) {
			skipped = append(skipped, t)
		}
	}
	kept := append([]*keptTarget(nil), s.kept...)
	s.mu.Unlock()
	sort.Slice(targets, func(i, j int) bool { return targets[i].pid < targets[j].pid })
	calls, _ := s.objs.ProcCalls()
	sampled := map[int]bool{}
	for _, smp := range built.Sample {
		if v := smp.Label["pid"]; len(v) == 1 {
			if pid, err := strconv.Atoi(v[0]); err == nil {
				sampled[pid] = true
			}
		}
	}
	var out []FragReport
	for _, k := range kept {
		scope := fmt.Sprintf("pid %d (%s)", k.pid, k.comm)
		rep := FragReport{Scope: scope, Coverage: k.cov.describe(), Notes: k.notes}
		switch {
		case k.exitMem != nil:
			rep.Scope += " at exit"
			rep.Regions = k.cov.exitRegions
			rep.Verdict = judge(k.allocator, k.cov, k.exitMem, k.cov.exitRegions, k.live)
		case len(k.samples) > 0:
			rep.Err = fmt.Errorf("process %s during the recording: no RSS to compare", k.why)
		default:
			continue
		}
		out = append(out, rep)
	}
	for _, t := range targets {
		scope := fmt.Sprintf("pid %d (%s)", t.pid, t.comm)
		rep := FragReport{Scope: scope, Coverage: t.cov.describe(), Notes: s.finalNotes(t, calls, sampled, true)}
		pm, err := frag.ReadProcess(t.pid)
		if err != nil {
			rep.Err = err
			out = append(out, rep)
			continue
		}
		if r, err := s.regions(t); err == nil {
			rep.Regions = &r
		}
		rep.Verdict = judge(t.allocator, t.cov, &pm, rep.Regions, uint64(max(live[t.pid], 0)))
		out = append(out, rep)
	}
	sort.Slice(skipped, func(i, j int) bool { return skipped[i].pid < skipped[j].pid })
	for _, t := range skipped {
		// A process of a followed cgroup memprof could not attach to (or
		// excluded): say so rather than leave it out silently.
		out = append(out, FragReport{Scope: fmt.Sprintf("pid %d (%s)", t.pid, t.comm),
			Notes: []string{"not profiled: it maps no allocator memprof can probe (or it could not be attached, or was excluded); its memory is not in the profile"},
			Err:   fmt.Errorf("no verdict: not profiled")})
	}
	for _, dir := range s.opts.Cgroups {
		st, err := cgroups.ReadStats(dir)
		if err != nil {
			out = append(out, FragReport{Scope: "cgroup " + dir, Err: err})
			continue
		}
		var sum int64
		var unseen uint64
		var allocs []frag.Allocator
		for _, t := range targets {
			sum += live[t.pid]
			allocs = append(allocs, t.allocator)
			if !t.cov.complete {
				unseen += t.cov.preAttach
			}
		}
		v := frag.AssessCgroup(st, uint64(max(sum, 0)), allocs)
		if v.Alarm && unseen > 0 {
			// The cgroup's processes were attached while running: the
			// alarm must hold whatever their earlier blocks were.
			if hi := frag.AssessCgroup(st, uint64(max(sum, 0))+unseen, allocs); !hi.Alarm {
				v.Withheld = fmt.Sprintf("its processes were attached while running; up to %s of blocks may predate the attach", human(unseen))
				v.Summary = fmt.Sprintf("cgroup %s: no verdict: %s (anon %s, live seen %s, ratio %.2f)", st.Path, v.Withheld, human(v.RSS), human(v.Live), v.Ratio)
				v.Alarm, v.Advice = false, nil
			}
		}
		r := FragReport{Scope: "cgroup " + dir, Verdict: v}
		if n := skippedIn(dir, skipped); n > 0 {
			withhold(&r, fmt.Sprintf("%d of its processes are not profiled", n))
		}
		out = append(out, r)
	}
	if c, err := s.objs.ReadCounters(); err == nil {
		if why := liveUndercount(c); why != "" {
			for i := range out {
				withhold(&out[i], why)
			}
		}
	}
	return out
}

// judge compares the allocator's share of RSS (the whole anonymous RSS
// when regions is nil) with live, bounded by what the recording may have
// missed.
func judge(a frag.Allocator, cov coverage, pm *frag.ProcessMem, regions *frag.Regions, live uint64) frag.Verdict {
	rss := pm.RssAnon
	if regions != nil {
		rss = regions.AllocatorRSS()
	}
	if cov.complete {
		return frag.Assess(a, rss, live, pm)
	}
	return frag.Bounded(a, rss, live, cov.preAttach, pm, "the recording did not see the process start: "+cov.how)
}

// maxBlocks bounds the live blocks read to classify a process's memory.
const maxBlocks = 1 << 22

// regions classifies the target's anonymous memory with the live blocks
// memprof saw in it.
func (s *Session) regions(t *target) (frag.Regions, error) {
	hb, err := heap.LiveBlocks(heap.FromObjects(&s.objs.MemprofObjects), uint32(t.pid), maxBlocks)
	if err != nil {
		return frag.Regions{}, err
	}
	blocks := make([]frag.Block, len(hb))
	for i, b := range hb {
		blocks[i] = frag.Block{Addr: b.Addr, Size: b.Size}
	}
	return frag.ReadRegions(t.pid, t.allocator, blocks)
}

// skippedIn counts the skipped processes found through dir.
func skippedIn(dir string, skipped []*target) int {
	n := 0
	for _, t := range skipped {
		if t.via == dir {
			n++
		}
	}
	return n
}

// FragComments records verdicts in profile comments, so `memprof report`
// can show them from the file alone.
func FragComments(reports []FragReport) []string {
	var out []string
	for _, r := range reports {
		if r.Coverage != "" {
			out = append(out, pprofout.MetaComment("coverage", r.Scope+": "+r.Coverage))
		}
		for _, n := range r.Notes {
			out = append(out, pprofout.MetaComment("unseen", r.Scope+": "+n))
		}
		if r.Err != nil {
			out = append(out, pprofout.MetaComment("frag", r.Scope+": "+r.Err.Error()))
			continue
		}
		v := r.Verdict
		verdict := "given"
		if r.Withheld != "" || v.Withheld != "" {
			verdict = "withheld"
		}
		out = append(out, pprofout.MetaComment("frag", fmt.Sprintf("%s: allocator=%s rss=%d live=%d ratio=%.3f excess=%d alarm=%t verdict=%s: %s",
			r.Scope, v.Allocator, v.RSS, v.Live, v.Ratio, v.Excess, v.Alarm, verdict, v.Summary)))
		if r.Regions != nil {
			out = append(out, pprofout.MetaComment("frag_rss", r.Scope+": "+r.Regions.String()))
		}
		for _, a := range v.Advice {
			out = append(out, pprofout.MetaComment("frag_advice", r.Scope+": "+a))
		}
	}
	return out
}
