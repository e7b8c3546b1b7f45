// Reading the sampled state and building profiles from it.

package recorder

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/pprofout"
)

// read reads the sampled state of the processes keep selects, with copied
// stacks resolved. drain waits (up to a second) for the event reader to
// consume the stack copies in flight first.
func (s *Session) read(keep func(uint32) bool, read func(heap.Maps, func(uint32) bool) (*heap.Snapshot, error), drain bool) (*heap.Snapshot, error) {
	if s.closed() {
		return nil, errors.New("the recording session is closed")
	}
	if s.events != nil && drain {
		// Let the event reader consume pending stack copies first.
		for i := 0; i < 100 && s.events.AvailableBytes() > 0; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	snap, err := read(heap.FromObjects(&s.objs.MemprofObjects), keep)
	if err != nil {
		return nil, err
	}
	if s.dwarf != nil {
		s.dwarf.resolve(snap, keep)
	}
	return snap, nil
}

// Counters returns the BPF side's counters.
func (s *Session) Counters() (bpfload.Counters, error) { return s.objs.ReadCounters() }

// Snapshot reads the sampled state of the running targets now, after
// handling the exits not noticed yet (the state of targets that went is
// kept symbolized, in the profiles).
func (s *Session) Snapshot() (*heap.Snapshot, error) {
	s.settle()
	s.exitMu.Lock()
	defer s.exitMu.Unlock()
	snap, _, err := s.readRunning(nil)
	return snap, err
}

// readRunning reads the state of the running targets only selects (nil:
// all); the caller holds exitMu.
func (s *Session) readRunning(only func(uint32) bool) (*heap.Snapshot, map[int]*target, error) {
	s.mu.Lock()
	procs := map[int]*target{}
	for pid, t := range s.procs {
		if !t.skipped && (only == nil || only(uint32(pid))) {
			procs[pid] = t
		}
	}
	s.mu.Unlock()
	snap, err := s.read(func(p uint32) bool { return procs[int(p)] != nil }, heap.Read, true)
	return snap, procs, err
}

// Profile builds the heap profile of everything recorded so far: the
// running targets as they are now, the ones that went as they were then.
func (s *Session) Profile() (*pprofout.Profile, error) {
	p, _, err := s.profile(nil, nil)
	return p, err
}

// profile builds a profile of the running targets onlyLive selects and the
// kept targets onlyKept selects (nil: all). Exits not noticed yet are
// handled first, so every target that went is in it. mark is the exit
// mark of the last kept target included.
func (s *Session) profile(onlyLive func(uint32) bool, onlyKept func(*keptTarget) bool) (p *pprofout.Profile, mark uint64, err error) {
	s.settle()
	s.exitMu.Lock()
	marks := s.goneMarks()
	snap, procs, err := s.readRunning(onlyLive)
	if err != nil {
		s.exitMu.Unlock()
		return nil, 0, err
	}
	smps := s.samples(snap, procs, nil)
	kept, mark := s.keptSamples(onlyKept)
	if onlyLive == nil {
		// Only a snapshot of every target can tell that no sample refers
		// to an unloaded mapping any more.
		s.releaseSymbols(snap, marks)
	}
	// Name the objects memprof could not read (broken, hostile or over a
	// limit of package targetfs): their frames carry no function names.
	for pid, t := range procs {
		if t.sym == nil {
			continue
		}
		for _, e := range t.sym.Errors() {
			s.recordErr(fmt.Errorf("process %d: %w", pid, e))
		}
	}
	s.exitMu.Unlock()
	p = s.newProfile()
	p.Samples = append(smps, kept...)
	return p, mark, nil
}

// samples turns a snapshot into profile samples, symbolized with the
// targets in procs; only selects processes (nil: all).
func (s *Session) samples(snap *heap.Snapshot, procs map[int]*target, only func(pid uint32) bool) []pprofout.Sample {
	unknown := &pprofout.Location{Lines: []pprofout.Line{{Function: "[stack unavailable]"}}}
	truncated := &pprofout.Location{Lines: []pprofout.Line{{Function: "[truncated]"}}}
	pending := &pprofout.Location{Lines: []pprofout.Line{{Function: "[table pending]"}}}
	refreshed := map[*target]bool{}
	var out []pprofout.Sample
	for _, b := range snap.Buckets {
		if only != nil && !only(b.Pid) {
			continue
		}
		t := procs[int(b.Pid)]
		var stack []*pprofout.Location
		if addrs, ok := snap.Stacks[b.StackID]; ok && len(addrs) > 0 && t != nil && t.sym != nil {
			if !refreshed[t] && !t.sym.Covers(addrs) {
				// A sample in a mapping not seen yet (the mappings are
				// looked at rarely while they do not change): read them
				// now, once per target and profile.
				refreshed[t] = true
				_ = t.sym.Refresh() // its errors are named in the profile (Errors)
				s.MappingsChanged(t.pid)
			}
			stack = t.sym.Locate(addrs)
		}
		if len(stack) == 0 {
			stack = []*pprofout.Location{unknown}
		} else if snap.Pending[b.StackID] {
			stack = append(stack[:len(stack):len(stack)], pending, truncated)
		} else if snap.Truncated[b.StackID] {
			stack = append(stack[:len(stack):len(stack)], truncated)
		}
		labels := map[string]string{"pid": strconv.Itoa(int(b.Pid))}
		if t != nil {
			labels["comm"] = t.comm
			if t.cgroup != "" {
				labels["cgroup"] = t.cgroup
			}
		}
		out = append(out, pprofout.Sample{
			Stack:      stack,
			Size:       b.Size,
			AllocCount: b.AllocCount,
			InuseCount: b.InuseCount,
			Labels:     labels,
		})
	}
	return out
}

// newProfile is an empty profile of the session with its comments:
// counters and losses, targets skipped or lost, unwinding and symbol
// statistics, errors.
func (s *Session) newProfile() *pprofout.Profile {
	p := &pprofout.Profile{
		SampleRate: s.opts.SampleRate,
		Start:      s.start,
		Duration:   time.Since(s.start),
	}
	c, err := s.objs.ReadCounters()
	if err == nil {
		p.Comments = append(p.Comments, countersComments(c)...)
	}
	p.Comments = append(p.Comments, targetComments(s.TargetCounts(), s.Exited())...)
	if panicked, timedOut := targetfs.Failures(); panicked+timedOut > 0 {
		p.Comments = append(p.Comments, pprofout.MetaComment("objects_skipped_panic", strconv.FormatInt(panicked, 10)),
			pprofout.MetaComment("objects_skipped_deadline", strconv.FormatInt(timedOut, 10)))
	}
	p.Comments = append(p.Comments, pprofout.MetaComment("sample_rate", strconv.FormatUint(s.opts.SampleRate, 10)),
		pprofout.MetaComment("stack_mode", s.opts.StackMode))
	if s.dwarf != nil {
		u, tr, full := s.dwarf.stats()
		tables, bytes := s.dwarf.tableStats()
		if full > 0 {
			p.Comments = append(p.Comments, pprofout.MetaComment("lost_cfi_alloc_buckets_full", strconv.FormatUint(full, 10)))
		}
		p.Comments = append(p.Comments, pprofout.MetaComment("stacks_unwound", strconv.FormatUint(u, 10)),
			pprofout.MetaComment("stacks_truncated", strconv.FormatUint(tr, 10)),
			pprofout.MetaComment("unwind_tables", strconv.Itoa(tables)),
			pprofout.MetaComment("unwind_table_bytes", strconv.FormatInt(bytes, 10)))
		p.Comments = append(p.Comments, s.dwarf.comments()...)
	}
	var gone int
	var dropped uint64
	s.mu.Lock()
	procs := make([]*target, 0, len(s.procs))
	for _, t := range s.procs {
		procs = append(procs, t)
	}
	s.mu.Unlock()
	for _, t := range procs {
		if t.sym != nil {
			g, d := t.sym.Retained()
			gone, dropped = gone+g, dropped+d
		}
	}
	s.mu.Lock()
	for _, k := range s.kept { // symbolized at their exit, with these mappings
		gone, dropped = gone+k.goneKept, dropped+k.goneDropped
	}
	s.mu.Unlock()
	p.Comments = append(p.Comments, pprofout.MetaComment("unloaded_mappings_kept", strconv.Itoa(gone)))
	if dropped > 0 {
		// Frames in these mappings are left unsymbolized (symbolize.MaxGoneMappings).
		p.Comments = append(p.Comments, pprofout.MetaComment("lost_unloaded_mappings", strconv.FormatUint(dropped, 10)))
	}
	objects, symBytes := s.sym.Stats()
	p.Comments = append(p.Comments, pprofout.MetaComment("symbol_objects", strconv.Itoa(objects)),
		pprofout.MetaComment("symbol_bytes", strconv.FormatInt(symBytes, 10)))
	s.mu.Lock()
	for _, e := range s.errs {
		p.Comments = append(p.Comments, "memprof error: "+e)
	}
	s.mu.Unlock()
	return p
}

func countersComments(c bpfload.Counters) []string {
	out := []string{
		pprofout.MetaComment("calls", strconv.FormatUint(c.Calls, 10)),
		pprofout.MetaComment("frees", strconv.FormatUint(c.Frees, 10)),
		pprofout.MetaComment("samples", strconv.FormatUint(c.Samples, 10)),
		pprofout.MetaComment("nested_calls", strconv.FormatUint(c.Nested, 10)),
	}
	lost := c.Lost()
	keys := make([]string, 0, len(lost))
	for k := range lost {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, pprofout.MetaComment("lost_"+k, strconv.FormatUint(lost[k], 10)))
	}
	return out
}

// goneMarks takes each target symbolizer's GoneMark, before a Snapshot:
// only mappings gone before it may be released after that snapshot. Targets
// with no unloaded mapping (nothing to release) are left out.
func (s *Session) goneMarks() map[int]uint64 {
	s.mu.Lock()
	procs := map[int]*target{}
	for pid, t := range s.procs {
		procs[pid] = t
	}
	s.mu.Unlock()
	marks := map[int]uint64{}
	for pid, t := range procs {
		if t.sym == nil {
			continue
		}
		if gone, _ := t.sym.Retained(); gone > 0 {
			marks[pid] = t.sym.GoneMark()
		}
	}
	return marks
}

// releaseSymbols lets each target's symbolizer drop the mappings that left
// the process (dlclose) before marks were taken and that no stack of snap
// refers to any more. snap must hold every target's samples (Snapshot),
// read after the marks and already symbolized.
func (s *Session) releaseSymbols(snap *heap.Snapshot, marks map[int]uint64) {
	if len(marks) == 0 {
		return
	}
	s.mu.Lock()
	procs := map[int]*target{}
	for pid := range marks {
		if t := s.procs[pid]; t != nil && t.sym != nil {
			procs[pid] = t
		}
	}
	s.mu.Unlock()
	addrs := map[uint32][]uint64{}
	type key struct {
		pid   uint32
		stack uint64
	}
	seen := map[key]bool{}
	for _, b := range snap.Buckets {
		k := key{b.Pid, b.StackID}
		if procs[int(b.Pid)] == nil || seen[k] {
			continue
		}
		seen[k] = true
		addrs[b.Pid] = append(addrs[b.Pid], snap.Stacks[b.StackID]...)
	}
	for pid, t := range procs {
		t.sym.Release(addrs[uint32(pid)], marks[pid])
	}
}

// ProcCalls returns the allocator calls counted per target process.
func (s *Session) ProcCalls() (map[uint32]uint64, error) { return s.objs.ProcCalls() }

// ProfileFor builds the profile of the running processes only selects, as
// they are now (the state of targets that went is in ProfileOfCgroups and
// Profile).
func (s *Session) ProfileFor(only func(pid uint32) bool) (*pprofout.Profile, error) {
	p, _, err := s.profile(only, func(*keptTarget) bool { return false })
	return p, err
}

// Links is the number of probe links in place.
func (s *Session) Links() int { return s.att.Links() }

// PruneInterval is how often a long-running session (DropExited) drops the
// stacks nothing refers to any more.
var PruneInterval = 30 * time.Second

// pruneStacks drops unreferenced stacks from the BPF stack map and the
// interned CFI stacks.
func (s *Session) pruneStacks() {
	s.lastPrune = time.Now()
	m := heap.FromObjects(&s.objs.MemprofObjects)
	refs, err := heap.Referenced(m)
	if err != nil {
		s.recordErr(err)
		return
	}
	if s.staleStacks == nil {
		s.staleStacks = map[uint64]bool{}
	}
	heap.PruneStacks(m, refs, s.staleStacks)
	if s.dwarf != nil {
		s.dwarf.prune()
	}
}

// MapStats reports the occupancy of the BPF maps that bound the recording.
func (s *Session) MapStats() []bpfload.MapStat { return s.objs.MapStats() }

// Counts reads the sampled counts per (process, stack, size) of the
// attached targets without their stacks: what metrics need, cheaper than
// Snapshot when the maps are full.
func (s *Session) Counts() (*heap.Snapshot, error) {
	live := s.Targets()
	return s.read(func(p uint32) bool { _, ok := live[int(p)]; return ok }, heap.ReadCounts, true)
}
