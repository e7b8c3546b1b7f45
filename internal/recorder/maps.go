// Following the targets' mappings: allocators loaded with dlopen, new
// objects to symbolize, libraries without frame pointers. The mappings are
// looked at when they may have changed, not re-read at every poll.

package recorder

import (
	"hash/fnv"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
)

// A target's mappings are looked at mapCheckMin after it is attached and
// after each change seen; while they stay the same the wait doubles, up to
// mapCheckMax. MappingsChanged (an exec or mmap event) and a sample at an
// address outside every known mapping (profileOf) bring the next look
// forward to the next poll. One look is one read of /proc/PID/maps; the
// work it gates (attach, symbol refresh, stack mode: three more reads)
// runs only when the executable file mappings changed.
var (
	mapCheckMin = time.Second
	mapCheckMax = 30 * time.Second
)

// mapState is when a target's mappings are next looked at, the wait after
// that when they have not changed, and a fingerprint of the executable file
// mappings seen last; remap: look at the next poll.
type mapState struct {
	next  time.Time
	gap   time.Duration
	fp    uint64
	remap bool
}

// MappingsChanged tells the session that process pid may have new
// mappings (it called exec, or mapped an executable region): they are
// looked at at the next poll.
func (s *Session) MappingsChanged(pid int) {
	s.mu.Lock()
	if t := s.procs[pid]; t != nil {
		t.mapping.remap = true
	}
	s.mu.Unlock()
}

// checkMappings looks at a target's mappings when due, and when its
// executable file mappings changed, attaches to allocators it loaded,
// refreshes its symbols and its stack mode (symOnly: only the symbols, for
// the command memprof started, whose execs the tracer handles).
func (s *Session) checkMappings(t *target, symOnly bool) {
	now := time.Now()
	s.mu.Lock()
	due := t.mapping.remap || !now.Before(t.mapping.next)
	t.mapping.remap = false
	s.mu.Unlock()
	if !due {
		return
	}
	ms, err := procmaps.Read(t.pid)
	if err != nil {
		t.mapping.next = now.Add(mapCheckMin) // exiting: the liveness check follows
		return
	}
	fp := execFingerprint(ms)
	if fp == t.mapping.fp {
		t.mapping.gap = min(2*t.mapping.gap, mapCheckMax)
		t.mapping.next = now.Add(t.mapping.gap)
		return
	}
	t.mapping.fp = fp
	t.mapping.gap = mapCheckMin
	t.mapping.next = now.Add(t.mapping.gap)
	if symOnly {
		if t.sym != nil {
			_ = t.sym.Refresh() // its errors are named in the profile (Errors)
		}
		return
	}
	s.refreshTarget(t)
}

// execFingerprint is a hash of the executable file mappings (range,
// offset, device and inode of each): it changes with a dlopen, dlclose or
// exec, not with heap growth or anonymous mappings.
func execFingerprint(ms []procmaps.Mapping) uint64 {
	h := fnv.New64a()
	var b [8]byte
	put := func(v uint64) {
		for i := range b {
			b[i] = byte(v >> (8 * i))
		}
		h.Write(b[:])
	}
	for i := range ms {
		m := &ms[i]
		if !m.Exec() || !m.IsFile() {
			continue
		}
		put(m.Start)
		put(m.End)
		put(m.Offset)
		put(m.ID().Dev)
		put(m.Inode)
	}
	return h.Sum64()
}
