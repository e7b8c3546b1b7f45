package recorder

import (
	"fmt"
	"sort"
	"strconv"

	"github.com/google/pprof/profile"

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
	var targets []*target
	for _, t := range s.procs {
		targets = append(targets, t)
	}
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
	for _, t := range targets {
		if t.skipped {
			// A process of a followed cgroup memprof could not attach
			// to: say so rather than leave it out silently.
			out = append(out, FragReport{Scope: fmt.Sprintf("pid %d (%s)", t.pid, t.comm),
				Notes: []string{"not profiled: it maps no allocator memprof can probe (or it exited before it could be attached); its memory is not in the profile"},
				Err:   fmt.Errorf("no verdict: not profiled")})
			continue
		}
		scope := fmt.Sprintf("pid %d (%s)", t.pid, t.comm)
		rep := FragReport{Scope: scope, Coverage: t.cov.describe(), Notes: s.finalNotes(t, calls, sampled)}
		lv := uint64(max(live[t.pid], 0))
		switch {
		case t.exited && t.exitMem != nil:
			rep.Scope += " at exit"
			rep.Regions = t.cov.exitRegions
			rep.Verdict = s.judge(t, t.exitMem, t.cov.exitRegions, lv)
		case t.exited:
			if _, ok := live[t.pid]; !ok {
				continue
			}
			rep.Err = fmt.Errorf("process exited during the recording: no RSS to compare")
		default:
			pm, err := frag.ReadProcess(t.pid)
			if err != nil {
				rep.Err = err
				break
			}
			if r, err := s.regions(t); err == nil {
				rep.Regions = &r
			}
			rep.Verdict = s.judge(t, &pm, rep.Regions, lv)
		}
		out = append(out, rep)
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
			if !t.exited {
				sum += live[t.pid]
				allocs = append(allocs, t.allocator)
				if !t.cov.complete {
					unseen += t.cov.preAttach
				}
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
		out = append(out, FragReport{Scope: "cgroup " + dir, Verdict: v})
	}
	return out
}

// judge compares the allocator's share of RSS (the whole anonymous RSS
// when regions is nil) with live, bounded by what the recording may have
// missed.
func (s *Session) judge(t *target, pm *frag.ProcessMem, regions *frag.Regions, live uint64) frag.Verdict {
	rss := pm.RssAnon
	if regions != nil {
		rss = regions.AllocatorRSS()
	}
	if t.cov.complete {
		return frag.Assess(t.allocator, rss, live, pm)
	}
	return frag.Bounded(t.allocator, rss, live, t.cov.preAttach, pm, "the recording did not see the process start: "+t.cov.how)
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
		out = append(out, pprofout.MetaComment("frag", fmt.Sprintf("%s: allocator=%s rss=%d live=%d ratio=%.3f excess=%d alarm=%t: %s",
			r.Scope, v.Allocator, v.RSS, v.Live, v.Ratio, v.Excess, v.Alarm, v.Summary)))
		if r.Regions != nil {
			out = append(out, pprofout.MetaComment("frag_rss", r.Scope+": "+r.Regions.String()))
		}
		for _, a := range v.Advice {
			out = append(out, pprofout.MetaComment("frag_advice", r.Scope+": "+a))
		}
	}
	return out
}
