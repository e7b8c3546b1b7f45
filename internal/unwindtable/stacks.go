package unwindtable

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// bpfStack mirrors struct uw_stack of bpf/unwind.h.
type bpfStack struct {
	Check     uint64
	N, Status uint32
	PCs       [MaxFrames]uint64
}

// MaxFrames is UW_MAX_FRAMES, the frame limit of a BPF walk.
const MaxFrames = 127

// Statuses of a BPF walk (enum uw_status of bpf/unwind.h).
const (
	// StatusComplete is the status of a walk that reached the stack's end:
	// every other status is a truncation.
	StatusComplete = 0
	// StatusPending is the status of a walk that stopped at an object
	// whose table was not loaded yet (being built, or refused for lack of
	// room).
	StatusPending = 3
)

// ReadStack returns the frames and status of the stack uw_intern stored
// under id in uw_stacks. Errors: no such stack (ebpf.ErrKeyNotExist), or a
// frame count beyond MaxFrames.
func ReadStack(stacks *ebpf.Map, id uint64) (pcs []uint64, complete bool, err error) {
	pcs, status, err := ReadStackStatus(stacks, id)
	return pcs, status == StatusComplete, err
}

// ReadStackStatus is ReadStack with the walk's status (enum uw_status:
// StatusComplete, StatusPending, ...). Same errors.
func ReadStackStatus(stacks *ebpf.Map, id uint64) (pcs []uint64, status uint32, err error) {
	var v bpfStack
	if err := stacks.Lookup(id, &v); err != nil {
		return nil, 0, fmt.Errorf("unwindtable: stack %#x: %w", id, err)
	}
	if v.N > MaxFrames {
		return nil, 0, fmt.Errorf("unwindtable: stack %#x has %d frames (limit %d)", id, v.N, MaxFrames)
	}
	return append([]uint64(nil), v.PCs[:v.N]...), v.Status, nil
}

// InternStats counts uw_intern's outcomes (uw_intern_stats, summed over
// CPUs): stacks stored, found already stored, and not stored because both
// slots of their hash held other stacks or the map was full.
type InternStats struct {
	New, Found, Collisions, Full uint64
}

// ReadInternStats reads uw_intern_stats.
func ReadInternStats(m *ebpf.Map) (InternStats, error) {
	var s InternStats
	for i, f := range []*uint64{&s.New, &s.Found, &s.Collisions, &s.Full} {
		var per []uint64
		if err := m.Lookup(uint32(i), &per); err != nil {
			return s, fmt.Errorf("unwindtable: read intern counter %d: %w", i, err)
		}
		for _, v := range per {
			*f += v
		}
	}
	return s, nil
}
