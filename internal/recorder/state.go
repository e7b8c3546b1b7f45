// Reading the sampled state and building profiles from it.

package recorder

import (
	"sort"
	"strconv"
	"time"

	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/pprofout"
)

// readState reads the sampled state of the processes keep selects, with
// copied stacks resolved.
func (s *Session) readState(keep func(uint32) bool) (*heap.Snapshot, error) {
	return s.read(keep, heap.Read)
}

func (s *Session) read(keep func(uint32) bool, read func(heap.Maps, func(uint32) bool) (*heap.Snapshot, error)) (*heap.Snapshot, error) {
	if s.events != nil {
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

// Snapshot reads the sampled state of all targets now, including the frozen
// state of the ones that exited.
func (s *Session) Snapshot() (*heap.Snapshot, error) {
	s.mu.Lock()
	live := map[uint32]bool{}
	for pid, t := range s.procs {
		if !t.exited {
			live[uint32(pid)] = true
		}
	}
	s.mu.Unlock()
	snap, err := s.readState(func(p uint32) bool { return live[p] })
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	snap.Merge(s.frozen)
	s.mu.Unlock()
	return snap, nil
}

// Profile builds the heap profile of everything recorded so far.
func (s *Session) Profile() (*pprofout.Profile, error) {
	snap, err := s.Snapshot()
	if err != nil {
		return nil, err
	}
	return s.profileOf(snap, nil)
}

// profileOf turns a snapshot into a profile; only selects processes (nil: all).
func (s *Session) profileOf(snap *heap.Snapshot, only func(pid uint32) bool) (*pprofout.Profile, error) {
	p := &pprofout.Profile{
		SampleRate: s.opts.SampleRate,
		Start:      s.start,
		Duration:   time.Since(s.start),
	}
	unknown := &pprofout.Location{Lines: []pprofout.Line{{Function: "[stack unavailable]"}}}
	truncated := &pprofout.Location{Lines: []pprofout.Line{{Function: "[truncated]"}}}
	s.mu.Lock()
	procs := map[int]*target{}
	for pid, t := range s.procs {
		procs[pid] = t
	}
	s.mu.Unlock()
	refreshed := map[*target]bool{}
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
				t.sym.Refresh()
				s.MappingsChanged(t.pid)
			}
			stack = t.sym.Locate(addrs)
		}
		if len(stack) == 0 {
			stack = []*pprofout.Location{unknown}
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
		p.Samples = append(p.Samples, pprofout.Sample{
			Stack:      stack,
			Size:       b.Size,
			AllocCount: b.AllocCount,
			InuseCount: b.InuseCount,
			Labels:     labels,
		})
	}
	c, err := s.objs.ReadCounters()
	if err == nil {
		p.Comments = append(p.Comments, countersComments(c)...)
	}
	p.Comments = append(p.Comments, pprofout.MetaComment("sample_rate", strconv.FormatUint(s.opts.SampleRate, 10)),
		pprofout.MetaComment("stack_mode", s.opts.StackMode))
	if s.dwarf != nil {
		u, tr, full := s.dwarf.stats()
		tables, bytes := s.dwarf.cache.Stats()
		if full > 0 {
			p.Comments = append(p.Comments, pprofout.MetaComment("lost_cfi_alloc_buckets_full", strconv.FormatUint(full, 10)))
		}
		p.Comments = append(p.Comments, pprofout.MetaComment("stacks_unwound", strconv.FormatUint(u, 10)),
			pprofout.MetaComment("stacks_truncated", strconv.FormatUint(tr, 10)),
			pprofout.MetaComment("unwind_tables", strconv.Itoa(tables)),
			pprofout.MetaComment("unwind_table_bytes", strconv.FormatInt(bytes, 10)))
	}
	objects, symBytes := s.sym.Stats()
	p.Comments = append(p.Comments, pprofout.MetaComment("symbol_objects", strconv.Itoa(objects)),
		pprofout.MetaComment("symbol_bytes", strconv.FormatInt(symBytes, 10)))
	s.mu.Lock()
	for _, e := range s.errs {
		p.Comments = append(p.Comments, "memprof error: "+e)
	}
	s.mu.Unlock()
	return p, nil
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

// ProcCalls returns the allocator calls counted per target process.
func (s *Session) ProcCalls() (map[uint32]uint64, error) { return s.objs.ProcCalls() }

// ProfileFor builds the profile of the processes only selects, from the
// current state (including kept state of exited ones).
func (s *Session) ProfileFor(only func(pid uint32) bool) (*pprofout.Profile, error) {
	snap, err := s.Snapshot()
	if err != nil {
		return nil, err
	}
	return s.profileOf(snap, only)
}

// Attacher exposes probe statistics (links in place).
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
		s.staleStacks = map[uint32]bool{}
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
	return s.read(func(p uint32) bool { _, ok := live[int(p)]; return ok }, heap.ReadCounts)
}
