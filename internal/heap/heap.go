// Package heap reads the BPF side's sampled state — live blocks, per-bucket
// allocation counts and stacks — and aggregates it per (process, stack,
// block size), the unit pprof heap profiles are unsampled by.
package heap

import (
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/cilium/ebpf"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/unwindtable"
)

// Key identifies a bucket.
type Key struct {
	Pid     uint32
	StackID uint64 // see StackUnknown, CopiedStack, RetStack; with Maps.UwStacks a key of uw_stacks
	Size    uint64
}

// Bucket holds sampled counts of one (process, stack, size).
type Bucket struct {
	Key
	AllocCount uint64 // sampled allocations since the start of the window
	InuseCount uint64 // sampled blocks live now (or at the process's exit)
}

// Snapshot is the sampled heap state of some processes at one moment.
type Snapshot struct {
	Buckets []Bucket
	Stacks  map[uint64][]uint64 // stack id -> return addresses, leaf first
	// Memcg is, per process, the memory cgroup id its live blocks were
	// allocated in (the most common one).
	Memcg map[uint32]uint64
	// Truncated marks stacks whose unwinding stopped before the outermost
	// frame.
	Truncated map[uint64]bool
	// Pending marks the truncated stacks whose walk stopped at an object
	// whose unwind table was not built yet (a subset of Truncated).
	Pending map[uint64]bool
}

// CopiedStack is the flag of stack ids that are sequence numbers of stacks
// copied for userspace unwinding (STACK_DWARF in bpf/memprof.h): their
// stacks and allocation counts are resolved by the recorder.
const CopiedStack = uint64(mbpf.MemprofStackIdFlagSTACK_DWARF)

// RetStack is the flag of stack ids that are keys of the ret_stacks map:
// stacks taken at an allocator's ret instruction, whose first frame (the
// allocator) is replaced by the caller's return address (STACK_RET).
const RetStack = uint64(mbpf.MemprofStackIdFlagSTACK_RET)

// CFIStack reports whether id is a key of uw_stacks: a stack walked with
// CFI in BPF (ids from 2^32 up; the other kinds are below).
func CFIStack(id uint64) bool { return id > math.MaxUint32 }

func (m Maps) copied(id uint64) bool {
	return !CFIStack(id) && id&CopiedStack != 0 && id != StackUnknown
}

func (m Maps) atRet(id uint64) bool {
	return !CFIStack(id) && id&RetStack != 0 && !m.copied(id) && id != StackUnknown
}

// StackUnknown is the stack id of samples whose stack walk failed.
const StackUnknown = uint64(mbpf.MemprofStackIdFlagSTACK_UNKNOWN)

// Maps are the BPF maps a Reader reads.
type Maps struct {
	Live, Allocs, Stacks, RetStacks *ebpf.Map
	// UwStacks is uw_stacks: the stacks walked with CFI in BPF (stack
	// ids for which CFIStack is true; --stack-mode cfi). nil: none.
	UwStacks *ebpf.Map
}

// FromObjects picks the maps out of the loaded objects.
func FromObjects(o *mbpf.MemprofObjects) Maps {
	return Maps{Live: o.Live, Allocs: o.Allocs, Stacks: o.Stacks, RetStacks: o.RetStacks, UwStacks: o.UwStacks}
}

// Read aggregates the state of the processes keep selects (nil: all).
func Read(m Maps, keep func(pid uint32) bool) (*Snapshot, error) {
	return read(m, keep, true)
}

// ReadCounts is Read without the stacks: the counts per bucket only, for
// metrics computed every few seconds.
func ReadCounts(m Maps, keep func(pid uint32) bool) (*Snapshot, error) {
	return read(m, keep, false)
}

func read(m Maps, keep func(pid uint32) bool, withStacks bool) (*Snapshot, error) {
	if keep == nil {
		keep = func(uint32) bool { return true }
	}
	buckets := map[Key]*Bucket{}
	get := func(k Key) *Bucket {
		b := buckets[k]
		if b == nil {
			b = &Bucket{Key: k}
			buckets[k] = b
		}
		return b
	}
	memcgVotes := map[uint32]map[uint64]int{}

	err := eachAlloc(m, func(k mbpf.MemprofAllocKey, n uint64) {
		if keep(k.Tgid) {
			get(Key{k.Tgid, k.StackId, k.Size}).AllocCount += n
		}
	})
	if err != nil {
		return nil, err
	}
	err = eachLiveBatch(m, func(k mbpf.MemprofLiveKey, lb mbpf.MemprofLiveBlock) {
		if !keep(k.Tgid) {
			return
		}
		get(Key{k.Tgid, lb.StackId, lb.Size}).InuseCount++
		if memcgVotes[k.Tgid] == nil {
			memcgVotes[k.Tgid] = map[uint64]int{}
		}
		memcgVotes[k.Tgid][lb.Memcg]++
	})
	if err != nil {
		return nil, err
	}

	s := &Snapshot{Stacks: map[uint64][]uint64{}, Memcg: map[uint32]uint64{}}
	for pid, votes := range memcgVotes {
		best, bestN := uint64(0), -1
		for id, n := range votes {
			if n > bestN {
				best, bestN = id, n
			}
		}
		s.Memcg[pid] = best
	}
	for _, b := range buckets {
		if m.copied(b.StackID) {
			s.Buckets = append(s.Buckets, *b)
			continue
		}
		// A block resized by xallocx can be live without an alloc count of
		// its new size; it was still allocated in the window.
		if b.AllocCount < b.InuseCount {
			b.AllocCount = b.InuseCount
		}
		s.Buckets = append(s.Buckets, *b)
		if _, ok := s.Stacks[b.StackID]; withStacks && !ok && b.StackID != StackUnknown {
			if CFIStack(b.StackID) {
				if m.UwStacks == nil {
					continue
				}
				if err := s.readCFIStack(m.UwStacks, b.StackID); err != nil {
					return nil, err
				}
				continue
			}
			st, err := readStackID(m, b.StackID)
			if err != nil {
				return nil, err
			}
			s.Stacks[b.StackID] = st
			if len(st) >= int(mbpf.MemprofBoundsMAX_STACK_DEPTH) {
				// A frame-pointer walk that filled every frame was cut
				// at the depth limit: it cannot be known complete.
				if s.Truncated == nil {
					s.Truncated = map[uint64]bool{}
				}
				s.Truncated[b.StackID] = true
			}
		}
	}
	sort.Slice(s.Buckets, func(i, j int) bool {
		a, b := s.Buckets[i], s.Buckets[j]
		if a.Pid != b.Pid {
			return a.Pid < b.Pid
		}
		if a.StackID != b.StackID {
			return a.StackID < b.StackID
		}
		return a.Size < b.Size
	})
	return s, nil
}

// readStackID reads a stack by id: from the stack map, or for a RetStack id
// the caller's address followed by its stack's frames after the first.
func readStackID(m Maps, id uint64) ([]uint64, error) {
	if !m.atRet(id) {
		return readStack(m.Stacks, id)
	}
	var rs mbpf.MemprofRetStack
	if m.RetStacks == nil {
		return nil, nil
	}
	if err := m.RetStacks.Lookup(uint32(id), &rs); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read return-site stack %#x: %w", id, err)
	}
	st, err := readStack(m.Stacks, uint64(rs.StackId))
	if err != nil || len(st) == 0 {
		return st, err
	}
	st[0] = rs.Caller
	return st, nil
}

func readStack(m *ebpf.Map, id uint64) ([]uint64, error) {
	var raw [mbpf.MemprofBoundsMAX_STACK_DEPTH]uint64
	if err := m.Lookup(uint32(id), &raw); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("read stack %d: %w", id, err)
	}
	n := 0
	for n < len(raw) && raw[n] != 0 {
		n++
	}
	return append([]uint64(nil), raw[:n]...), nil
}

// Forget deletes a process's entries from the live and allocation maps
// (after it exited and its state was read), so the maps' capacity is
// reclaimed. It returns how many entries were removed.
func Forget(m Maps, pid uint32) (int, error) {
	var liveKeys []mbpf.MemprofLiveKey
	err := eachLive(m, func(k mbpf.MemprofLiveKey, _ mbpf.MemprofLiveBlock) {
		if k.Tgid == pid {
			liveKeys = append(liveKeys, k)
		}
	})
	var allocKeys []mbpf.MemprofAllocKey
	if e := eachAlloc(m, func(k mbpf.MemprofAllocKey, _ uint64) {
		if k.Tgid == pid {
			allocKeys = append(allocKeys, k)
		}
	}); err == nil {
		err = e
	}
	removed := 0
	for _, k := range liveKeys {
		if m.Live.Delete(k) == nil {
			removed++
		}
	}
	for _, k := range allocKeys {
		if m.Allocs.Delete(k) == nil {
			removed++
		}
	}
	return removed, err
}

// eachAlloc calls fn for every allocation bucket in the map, batched where
// the kernel can (bpfload.EachEntry: the agent reads them every collection).
func eachAlloc(m Maps, fn func(mbpf.MemprofAllocKey, uint64)) error {
	if err := bpfload.EachEntry(m.Allocs, fn); err != nil {
		return fmt.Errorf("read allocation buckets: %w", err)
	}
	return nil
}

// eachLive calls fn for every live block in the map.
func eachLive(m Maps, fn func(mbpf.MemprofLiveKey, mbpf.MemprofLiveBlock)) error {
	var k mbpf.MemprofLiveKey
	var b mbpf.MemprofLiveBlock
	it := m.Live.Iterate()
	for it.Next(&k, &b) {
		fn(k, b)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read live blocks: %w", err)
	}
	return nil
}

// Merge adds the buckets and stacks of other into s (used to fold in the
// frozen state of processes that exited during the window).
func (s *Snapshot) Merge(other *Snapshot) {
	if other == nil {
		return
	}
	s.Buckets = append(s.Buckets, other.Buckets...)
	for id, st := range other.Stacks {
		if _, ok := s.Stacks[id]; !ok {
			s.Stacks[id] = st
		}
	}
	for pid, id := range other.Memcg {
		s.Memcg[pid] = id
	}
	for id := range other.Truncated {
		if s.Truncated == nil {
			s.Truncated = map[uint64]bool{}
		}
		s.Truncated[id] = true
	}
	for id := range other.Pending {
		if s.Pending == nil {
			s.Pending = map[uint64]bool{}
		}
		s.Pending[id] = true
	}
}

// Pids lists the processes in the snapshot.
func (s *Snapshot) Pids() []uint32 {
	seen := map[uint32]bool{}
	var out []uint32
	for _, b := range s.Buckets {
		if !seen[b.Pid] {
			seen[b.Pid] = true
			out = append(out, b.Pid)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Referenced returns the stack ids the live and allocation maps refer to.
func Referenced(m Maps) (map[uint64]bool, error) {
	refs := map[uint64]bool{}
	if err := eachAlloc(m, func(k mbpf.MemprofAllocKey, _ uint64) { refs[k.StackId] = true }); err != nil {
		return nil, err
	}
	if err := eachLive(m, func(_ mbpf.MemprofLiveKey, b mbpf.MemprofLiveBlock) { refs[b.StackId] = true }); err != nil {
		return nil, err
	}
	// A return-site stack refers to a stack of the stack map.
	for id := range refs {
		if m.atRet(id) && m.RetStacks != nil {
			var rs mbpf.MemprofRetStack
			if m.RetStacks.Lookup(uint32(id), &rs) == nil {
				refs[uint64(rs.StackId)] = true
			}
		}
	}
	return refs, nil
}

// PruneStacks deletes from the stack map the stacks that are neither
// referenced now nor were at the previous prune (stale holds those
// candidates and is updated): stacks of blocks freed long ago and of
// processes gone, so a long-running session does not fill the map. A stack
// must stay unreferenced across two prunes, so one that a sample reuses
// right after it was found unreferenced survives.
func PruneStacks(m Maps, refs map[uint64]bool, stale map[uint64]bool) (removed int) {
	type entry struct {
		id  uint64
		del func() error
	}
	var ids []entry
	var id uint32
	it := m.Stacks.Iterate()
	var raw [mbpf.MemprofBoundsMAX_STACK_DEPTH]uint64
	for it.Next(&id, &raw) {
		k := id
		ids = append(ids, entry{uint64(k), func() error { return m.Stacks.Delete(k) }})
	}
	if m.RetStacks != nil {
		var rs mbpf.MemprofRetStack
		it := m.RetStacks.Iterate()
		for it.Next(&id, &rs) {
			k := id
			ids = append(ids, entry{uint64(k), func() error { return m.RetStacks.Delete(k) }})
		}
	}
	if m.UwStacks != nil {
		// Keys only: a stack's value is 1 KiB.
		var key, next uint64
		var cur any
		for m.UwStacks.NextKey(cur, &next) == nil {
			k := next
			ids = append(ids, entry{k, func() error { return m.UwStacks.Delete(k) }})
			key = next
			cur = key
		}
	}
	nextStale := map[uint64]bool{}
	for _, e := range ids {
		if refs[e.id] {
			continue
		}
		if stale[e.id] {
			if e.del() == nil {
				removed++
			}
			continue
		}
		nextStale[e.id] = true
	}
	clear(stale)
	for id := range nextStale {
		stale[id] = true
	}
	return removed
}

// readCFIStack reads stack id of uw_stacks into s: its frames, and whether
// the walk was truncated (and stopped at a table not built yet). A stack
// deleted meanwhile (pruned) is left out: its samples show no stack.
func (s *Snapshot) readCFIStack(stacks *ebpf.Map, id uint64) error {
	pcs, status, err := unwindtable.ReadStackStatus(stacks, id)
	if err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return err
	}
	s.Stacks[id] = pcs
	if status != unwindtable.StatusComplete {
		if s.Truncated == nil {
			s.Truncated = map[uint64]bool{}
		}
		s.Truncated[id] = true
	}
	if status == unwindtable.StatusPending {
		if s.Pending == nil {
			s.Pending = map[uint64]bool{}
		}
		s.Pending[id] = true
	}
	return nil
}
