package rss

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"time"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// ProcSummary compares one process's RSS profile with its RssAnon.
type ProcSummary struct {
	Pid     int
	Comm    string
	Cgroup  string
	RssAnon int64 // bytes now (or at its exit, for a command); 0 if exited
	// Attributed is the estimated resident bytes faulted in during the
	// recording (rss_space without the before bucket).
	Attributed int64
	// Before is the [resident before recording] bucket: min(RssAnon when
	// first seen, RssAnon now - Attributed), at least 0.
	Before  int64
	Exited  bool
	Faulted int64 // estimated bytes faulted in during the recording
	// Regions splits Attributed by the kind of mapping it lies in.
	Regions Regions
}

type bucket struct {
	faulted  uint64
	resident float64
}

// Profile builds the RSS profile of every process seen (only: a filter by
// pid, nil for all) and a summary per process.
func (s *Session) Profile(only func(pid uint32) bool) (*pprofout.RSSProfile, []ProcSummary, error) {
	return s.profile(only, true)
}

// profile builds the profile; without verify every sampled folio still in
// the map counts as resident (an OOM victim, whose memory the kill is
// tearing down: the map holds what was not given back by the last check).
func (s *Session) profile(only func(pid uint32) bool, verify bool) (*pprofout.RSSProfile, []ProcSummary, error) {
	if only == nil {
		only = func(uint32) bool { return true }
	}
	pages := s.pagesOf(only)
	res := map[uint32][]float64{}
	s.mu.Lock()
	for pid, p := range s.procs {
		if p.frozen == nil || !only(uint32(pid)) {
			continue
		}
		// An exited command: its folios as read in the exit stop.
		entries := make([]pageEntry, len(p.frozen))
		r := make([]float64, len(p.frozen))
		for i, f := range p.frozen {
			entries[i], r[i] = f.pageEntry, f.resident
		}
		pages[uint32(pid)], res[uint32(pid)] = entries, r
	}
	s.mu.Unlock()
	for pid, entries := range pages {
		if _, ok := res[pid]; ok {
			continue
		}
		if !verify {
			r := make([]float64, len(entries))
			for i := range r {
				r[i] = 1
			}
			res[pid] = r
			continue
		}
		res[pid] = s.residencyOf(int(pid), entries)
	}
	var bpfFaults []struct {
		k mbpf.RssRssFaultKey
		n uint64
	}
	if err := bpfload.EachEntry(s.objs.RssFaults, func(fk mbpf.RssRssFaultKey, n uint64) {
		if only(fk.Tgid) {
			bpfFaults = append(bpfFaults, struct {
				k mbpf.RssRssFaultKey
				n uint64
			}{fk, n})
		}
	}); err != nil {
		return nil, nil, fmt.Errorf("read fault counts: %w", err)
	}
	st := s.newStackTable()

	buckets := map[faultKey]*bucket{}
	get := func(k faultKey) *bucket {
		b := buckets[k]
		if b == nil {
			b = &bucket{}
			buckets[k] = b
		}
		return b
	}
	regions := map[uint32]*Regions{}
	for pid, entries := range pages {
		var maps []procmaps.Mapping
		s.mu.Lock()
		if p := s.procs[int(pid)]; p != nil && p.frozen != nil {
			maps = p.frozenMaps
		}
		s.mu.Unlock()
		if maps == nil {
			maps, _ = procmaps.Read(int(pid))
		}
		sort.Slice(maps, func(i, j int) bool { return maps[i].Start < maps[j].Start })
		r := &Regions{}
		regions[pid] = r
		for i, e := range entries {
			r.add(regionOf(maps, e.key.Addr), int64(math.Round(res[pid][i]*float64(e.page.Size)*scaleOf(e.page.Size, s.opts.SampleRate))))
		}
	}
	for pid, entries := range pages {
		for i, e := range entries {
			get(faultKey{pid: pid, stack: st.resolve(e.page.StackId), size: e.page.Size}).resident += res[pid][i]
		}
	}
	var ss StackStats
	for _, f := range bpfFaults {
		k := faultKey{pid: f.k.Tgid, stack: st.resolve(f.k.StackId), size: f.k.Size}
		get(k).faulted += f.n
		ss.Samples += f.n
		switch {
		case k.stack < 0:
			ss.Unknown += f.n
		case st.status[k.stack] != unwindtable.StatusComplete:
			ss.Truncated += f.n
			switch st.status[k.stack] {
			case unwindtable.StatusPending:
				ss.Pending += f.n
			case statusNoMapping:
				ss.NoMapping += f.n
			}
		}
	}

	p := &pprofout.RSSProfile{SampleRate: s.opts.SampleRate}
	p.Start = s.start
	p.Duration = time.Since(s.start)
	unknown := &pprofout.Location{Lines: []pprofout.Line{{Function: "[stack unavailable]"}}}
	trunc := &pprofout.Location{Lines: []pprofout.Line{{Function: "[truncated]"}}}
	before := &pprofout.Location{Lines: []pprofout.Line{{Function: ResidentBefore}}}

	s.mu.Lock()
	defer s.mu.Unlock()
	attributed := map[uint32]float64{}
	faulted := map[uint32]float64{}
	refreshed := map[uint32]bool{}
	for k, b := range buckets {
		pr := s.noteProc(int(k.pid))
		if pr.sym != nil && !refreshed[k.pid] && pr.frozen == nil && !pr.exited {
			s.refreshSym(pr)
			refreshed[k.pid] = true
		}
		var stack []*pprofout.Location
		if k.stack >= 0 && pr.sym != nil {
			stack = pr.sym.Locate(st.stacks[k.stack])
			if len(stack) > 0 && st.status[k.stack] != unwindtable.StatusComplete {
				stack = append(stack[:len(stack):len(stack)], trunc)
			}
		}
		if len(stack) == 0 {
			stack = []*pprofout.Location{unknown}
		}
		scale := scaleOf(k.size, s.opts.SampleRate)
		attributed[k.pid] += b.resident * float64(k.size) * scale
		faulted[k.pid] += float64(b.faulted) * float64(k.size) * scale
		p.Samples = append(p.Samples, pprofout.RSSSample{
			Stack: stack, Size: k.size, Faulted: b.faulted, Resident: b.resident,
			Labels: s.labels(pr),
		})
	}
	var sums []ProcSummary
	for pid, pr := range s.procs {
		if !only(uint32(pid)) {
			continue
		}
		sum := ProcSummary{Pid: pid, Comm: pr.comm, Cgroup: pr.cgroup, Exited: pr.exited,
			Attributed: int64(math.Round(attributed[uint32(pid)])), Faulted: int64(math.Round(faulted[uint32(pid)]))}
		if r := regions[uint32(pid)]; r != nil {
			sum.Regions = *r
		}
		switch {
		case pr.frozen != nil:
			sum.RssAnon = pr.frozenAnon
		case !pr.exited:
			if pm, err := frag.ReadProcess(pid); err == nil {
				sum.RssAnon = int64(pm.RssAnon)
			} else {
				sum.Exited = true
			}
		}
		if sum.RssAnon > 0 {
			sum.Before = max(0, min(pr.startAnon, sum.RssAnon-sum.Attributed))
		}
		if sum.RssAnon == 0 && sum.Faulted == 0 {
			continue // exited without a sampled fault (a short-lived helper)
		}
		if sum.Before > 0 {
			p.Samples = append(p.Samples, pprofout.RSSSample{
				Stack: []*pprofout.Location{before}, Size: pageSize, ResidentBytes: sum.Before,
				Labels: s.labels(pr),
			})
		}
		sums = append(sums, sum)
	}
	p.Comments = append(p.Comments, s.statsComments()...)
	p.Comments = append(p.Comments, s.stackComments(ss)...)
	if verify {
		s.lastStacks = ss
	}
	for _, sum := range sums {
		p.Comments = append(p.Comments, pprofout.MetaComment("rss_anon_pid_"+strconv.Itoa(sum.Pid), strconv.FormatInt(sum.RssAnon, 10)))
	}
	for _, e := range s.errs {
		p.Comments = append(p.Comments, "memprof error: "+e)
	}
	return p, sums, nil
}

func (s *Session) labels(p *proc) map[string]string {
	l := map[string]string{"pid": strconv.Itoa(p.pid), "comm": p.comm}
	if p.cgroup != "" {
		l["cgroup"] = p.cgroup
	}
	return l
}

// scaleOf is the unsampling factor 1/(1-exp(-size/rate)) of Go's heap
// profile (1 at rate 1).
func scaleOf(size, rate uint64) float64 {
	if rate <= 1 || size == 0 {
		return 1
	}
	return 1 / (1 - math.Exp(-float64(size)/float64(rate)))
}
