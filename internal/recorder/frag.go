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
	"github.com/memprof/memprof/pprofout"
)

// FragReport is the fragmentation verdict of one process or cgroup.
type FragReport struct {
	Scope   string // "pid 1234 (redis-server)" or "cgroup /sys/fs/cgroup/..."
	Verdict frag.Verdict
	Err     error // why no verdict could be made (process gone, ...)
	// Withheld says why the verdict is not given though the figures are
	// (the live size is known to be undercounted); Verdict then holds the
	// figures, no alarm and no advice.
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
		{c.MissedReturn, "allocator calls whose return was never seen (longjmp)"},
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
	r.Withheld = reason
	v.Alarm, v.Advice = false, nil
	v.Summary = fmt.Sprintf("no verdict: the live size is undercounted (%s); figures only: RSS %s, live at least %s, ratio at most %.2f",
		reason, pprofout.HumanBytes(int64(v.RSS)), pprofout.HumanBytes(int64(v.Live)), v.Ratio)
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
// the live bytes estimated in the built profile against RSS now. Targets
// that exited have no RSS left to judge and are reported as such (a
// command's, read in its exit stop, is judged at its exit).
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
	var out []FragReport
	for _, k := range kept {
		scope := fmt.Sprintf("pid %d (%s)", k.pid, k.comm)
		switch {
		case k.exitMem != nil:
			v := frag.Assess(k.allocator, k.exitMem.RssAnon, k.live, k.exitMem)
			out = append(out, FragReport{Scope: scope + " at exit", Verdict: v})
		case len(k.samples) > 0:
			out = append(out, FragReport{Scope: scope, Err: fmt.Errorf("process %s during the recording: no RSS to compare", k.why)})
		}
	}
	for _, t := range targets {
		scope := fmt.Sprintf("pid %d (%s)", t.pid, t.comm)
		v, err := frag.AssessProcess(t.pid, uint64(max(live[t.pid], 0)))
		out = append(out, FragReport{Scope: scope, Verdict: v, Err: err})
	}
	for _, dir := range s.opts.Cgroups {
		st, err := cgroups.ReadStats(dir)
		if err != nil {
			out = append(out, FragReport{Scope: "cgroup " + dir, Err: err})
			continue
		}
		var sum int64
		var allocs []frag.Allocator
		for _, t := range targets {
			sum += live[t.pid]
			allocs = append(allocs, t.allocator)
		}
		r := FragReport{Scope: "cgroup " + dir, Verdict: frag.AssessCgroup(st, uint64(max(sum, 0)), allocs)}
		if n := skippedIn(dir, skipped); n > 0 {
			withhold(&r, fmt.Sprintf("%d of its processes are not profiled", n))
		}
		out = append(out, r)
	}
	if c, err := s.objs.ReadCounters(); err == nil {
		if why := liveUndercount(c); why != "" {
			for i := range out {
				if out[i].Withheld == "" {
					withhold(&out[i], why)
				}
			}
		}
	}
	return out
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
		if r.Err != nil {
			out = append(out, pprofout.MetaComment("frag", r.Scope+": "+r.Err.Error()))
			continue
		}
		v := r.Verdict
		verdict := "given"
		if r.Withheld != "" {
			verdict = "withheld"
		}
		out = append(out, pprofout.MetaComment("frag", fmt.Sprintf("%s: allocator=%s rss=%d live=%d ratio=%.3f excess=%d alarm=%t verdict=%s: %s",
			r.Scope, v.Allocator, v.RSS, v.Live, v.Ratio, v.Excess, v.Alarm, verdict, v.Summary)))
		for _, a := range v.Advice {
			out = append(out, pprofout.MetaComment("frag_advice", r.Scope+": "+a))
		}
	}
	return out
}
