// Following the targets' mappings: allocators loaded with dlopen, new
// objects to symbolize, libraries without frame pointers. The mappings are
// looked at when they may have changed, not re-read at every poll.

package recorder

import (
	"bytes"
	"errors"
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
	// tooLarge: the last look found the listing over
	// procmaps.MapsMaxBytes; remap does not bring the next look forward.
	tooLarge bool
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
	due := (t.mapping.remap && !t.mapping.tooLarge) || !now.Before(t.mapping.next)
	t.mapping.remap = false
	s.mu.Unlock()
	if !due {
		return
	}
	// The look hashes the text of the lines of executable file mappings
	// as it reads them: no mapping is parsed or kept unless they changed.
	data, err := procmaps.ReadRaw(t.pid)
	if errors.Is(err, procmaps.ErrMapsTooLarge) {
		// A listing over the bound (a hostile number of mappings or
		// path lengths): looked at again only every mapCheckMax, even
		// when its mappings are said to have changed, so it costs at
		// most one bounded read per mapCheckMax.
		t.mapping.tooLarge = true
		t.mapping.gap = mapCheckMax
		t.mapping.next = now.Add(mapCheckMax)
		return
	}
	if err != nil {
		t.mapping.next = now.Add(mapCheckMin) // exiting: the liveness check follows
		return
	}
	t.mapping.tooLarge = false
	fp := execFingerprint(data)
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

// execFingerprint is a hash of the executable file mappings of the text of
// a maps file (range, offset, device and inode of each): it changes with a
// dlopen, dlclose or exec, not with heap growth or anonymous mappings.
// Lines it cannot split are hashed whole (a change is then seen as one).
func execFingerprint(maps []byte) uint64 {
	h := fnv.New64a()
	for len(maps) > 0 {
		line := maps
		if i := bytes.IndexByte(maps, '\n'); i >= 0 {
			line, maps = maps[:i], maps[i+1:]
		} else {
			maps = nil
		}
		// start-end perms offset dev inode [path]
		var f [6][]byte
		rest := line
		n := 0
		for ; n < 5; n++ {
			rest = bytes.TrimLeft(rest, " ")
			i := bytes.IndexByte(rest, ' ')
			if i < 0 {
				f[n], rest = rest, nil
				n++
				break
			}
			f[n], rest = rest[:i], rest[i:]
		}
		f[5] = bytes.TrimLeft(rest, " ")
		if n < 5 {
			if len(line) > 0 {
				h.Write(line)
				h.Write([]byte{'\n'})
			}
			continue
		}
		exec := len(f[1]) > 2 && f[1][2] == 'x'
		file := !bytes.Equal(f[4], []byte("0")) && len(f[5]) > 0 && f[5][0] == '/'
		if !exec || !file {
			continue
		}
		for _, x := range [][]byte{f[0], f[2], f[3], f[4]} {
			h.Write(x)
			h.Write([]byte{' '})
		}
		h.Write([]byte{'\n'})
	}
	return h.Sum64()
}
