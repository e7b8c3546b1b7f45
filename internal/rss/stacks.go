package rss

import (
	"encoding/binary"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/internal/unwindtable"
)

const (
	stackUnknown = ^uint64(0) // RSS_STACK_UNKNOWN
	maxFrames    = 127        // RSS_STACK_DEPTH, UW_MAX_FRAMES
)

// faultKey is one (process, interned stack, folio size) bucket.
type faultKey struct {
	pid   uint32
	stack int // index in stackTable.stacks; -1: unknown
	size  uint64
}

// stackTable interns the stacks one profile refers to, read from the BPF
// maps by the ids its samples carry: keys of uw_stacks (CFI walks, with
// their status) or ids of the frame-pointer stack map. Built anew for each
// profile, so ids a prune freed and BPF reused are never confused.
type stackTable struct {
	uw      *ebpf.Map // uw_stacks (CFI mode), else nil
	fp      *ebpf.Map // rss_stacks (frame-pointer mode)
	byKey   map[string]int
	byID    map[uint64]int
	stacks  [][]uint64
	status  []uint32 // unwindtable.StatusComplete, or why the walk stopped
	missing int      // ids whose stack was no longer in its map
}

func newStackTable(uw, fp *ebpf.Map) *stackTable {
	return &stackTable{uw: uw, fp: fp, byKey: map[string]int{}, byID: map[uint64]int{}}
}

// intern returns the index of the stack pcs with its walk status.
func (t *stackTable) intern(pcs []uint64, status uint32) int {
	b := make([]byte, 0, 8*len(pcs)+4)
	for _, pc := range pcs {
		b = binary.LittleEndian.AppendUint64(b, pc)
	}
	b = binary.LittleEndian.AppendUint32(b, status)
	if i, ok := t.byKey[string(b)]; ok {
		return i
	}
	t.byKey[string(b)] = len(t.stacks)
	t.stacks = append(t.stacks, pcs)
	t.status = append(t.status, status)
	return len(t.stacks) - 1
}

// resolve returns the interned stack of a BPF stack id, -1 when unknown
// (no stack was stored for the sample, or it is gone from its map).
func (t *stackTable) resolve(sid uint64) int {
	if sid == stackUnknown {
		return -1
	}
	if i, ok := t.byID[sid]; ok {
		return i
	}
	i := -1
	if t.uw != nil {
		if pcs, status, err := unwindtable.ReadStackStatus(t.uw, sid); err == nil && len(pcs) > 0 {
			i = t.intern(pcs, status)
		} else {
			t.missing++
		}
	} else if t.fp != nil && sid <= 0xffffffff {
		var frames [maxFrames]uint64
		if err := t.fp.Lookup(uint32(sid), &frames); err == nil {
			var pcs []uint64
			for _, pc := range frames {
				if pc == 0 {
					break
				}
				pcs = append(pcs, pc)
			}
			if len(pcs) > 0 {
				// A walk that filled every frame was cut at the depth
				// limit (or went round a loop of frames, as a corrupt
				// stack's can): it cannot be known complete.
				status := uint32(unwindtable.StatusComplete)
				if len(pcs) == maxFrames {
					status = statusMaxFrames
				}
				i = t.intern(pcs, status)
			}
		} else {
			t.missing++
		}
	}
	t.byID[sid] = i
	return i
}

// StackStats count a profile's sampled faults by how their stacks were
// taken (a fault with several samples counts each).
type StackStats struct {
	Samples uint64 // sampled faults in the profile
	// Truncated: the walk could not complete (it ends in a [truncated]
	// frame); Pending of them stopped at an object whose unwind table was
	// not built yet, NoMapping at code mapped since memprof last listed the
	// process's mappings.
	Truncated, Pending, NoMapping uint64
	Unknown                       uint64 // no stack stored ([stack unavailable])
}

// UW_TRUNC_MAX_FRAMES and UW_TRUNC_NO_MAPPING of enum uw_status
// (bpf/unwind.h).
const (
	statusMaxFrames = 1
	statusNoMapping = 2
)
