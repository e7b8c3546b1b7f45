package unwind

import (
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"sync"
	"sync/atomic"

	"github.com/memprof/memprof/internal/targetfs"
)

// Cache holds parsed unwind tables per object, keyed by GNU build ID and
// content hash (objectKey); shared by all processes; bounded by bytes
// (least recently used tables are evicted first).
type Cache struct {
	maxBytes int64
	clock    atomic.Int64 // use counter for LRU ordering

	mu     sync.Mutex
	tables map[string]*cached
	bytes  int64
	loads  int64 // tables parsed (cache misses), for tests and metrics
}

type cached struct {
	tab      *table
	lastUse  atomic.Int64
	evicted  atomic.Bool
	oversize bool // larger than the whole budget: never retained, pinned by its users
}

// NewCache returns a cache holding at most maxBytes of parsed tables
// (maxBytes <= 0 means unbounded). A table larger than the whole budget is
// not retained by the cache; each Process that needs it keeps it while it
// lives rather than re-parsing it for every frame.
func NewCache(maxBytes int64) *Cache {
	return &Cache{maxBytes: maxBytes, tables: map[string]*cached{}}
}

// Stats reports the number of tables held and their estimated size in bytes.
func (c *Cache) Stats() (tables int, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.tables), c.bytes
}

// Loads reports how many tables have been parsed since the cache was made
// (each miss parses one object).
func (c *Cache) Loads() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loads
}

func (c *Cache) touch(e *cached) {
	e.lastUse.Store(c.clock.Add(1))
}

// get returns the table for key, parsing it from f on a miss. The parse runs
// under targetfs.Guard: a panic or a parse outliving its deadline fails the
// object (named by name) only.
func (c *Cache) get(key, name string, f *elf.File) (*cached, error) {
	c.mu.Lock()
	if e, ok := c.tables[key]; ok {
		c.mu.Unlock()
		c.touch(e)
		return e, nil
	}
	c.mu.Unlock()

	// Outside the lock: glibc takes milliseconds.
	var (
		mu  sync.Mutex
		tab *table
	)
	err := targetfs.Guard("call-frame information of "+name, 0, func() error {
		t, err := parseTable(f)
		mu.Lock()
		tab = t
		mu.Unlock()
		return err
	})
	if errors.Is(err, targetfs.ErrPanic) || errors.Is(err, targetfs.ErrDeadline) {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()
	if tab == nil {
		return nil, err
	}
	e := &cached{tab: tab}
	c.touch(e)

	c.mu.Lock()
	defer c.mu.Unlock()
	c.loads++
	if old, ok := c.tables[key]; ok { // parsed concurrently by another caller
		c.touch(old)
		return old, err
	}
	if c.maxBytes > 0 && tab.bytes > c.maxBytes {
		e.oversize = true
		e.evicted.Store(true) // usable now, not retained
		return e, err
	}
	c.tables[key] = e
	c.bytes += tab.bytes
	for c.maxBytes > 0 && c.bytes > c.maxBytes {
		var victimKey string
		var victim *cached
		for k, v := range c.tables {
			if v == e {
				continue
			}
			if victim == nil || v.lastUse.Load() < victim.lastUse.Load() {
				victim, victimKey = v, k
			}
		}
		if victim == nil {
			break
		}
		delete(c.tables, victimKey)
		c.bytes -= victim.tab.bytes
		victim.evicted.Store(true)
	}
	return e, err
}

// objectKey is the cache key of an object: its GNU build ID (if any) and
// the SHA-256 of its whole contents (targetfs.Digest), so a file claiming
// another's build ID cannot stand in for it, and copies of one library in
// several containers share one table.
func objectKey(f *elf.File, file *os.File) (string, error) {
	d, err := targetfs.Digest(file)
	if err != nil {
		return "", err
	}
	return "b:" + BuildID(f) + ":" + d, nil
}

// BuildID returns the hex GNU build ID of f, or "" if it has none. It reads
// at most targetfs.MaxNoteBytes of each note section or PT_NOTE segment.
func BuildID(f *elf.File) string {
	for _, s := range f.Sections {
		if s.Type != elf.SHT_NOTE {
			continue
		}
		data, err := targetfs.SectionData(s, targetfs.MaxNoteBytes)
		if err != nil {
			continue
		}
		if id := noteBuildID(data); id != "" {
			return id
		}
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE || p.Filesz > targetfs.MaxNoteBytes {
			continue
		}
		data := make([]byte, p.Filesz)
		if _, err := p.ReadAt(data, 0); err != nil {
			continue
		}
		if id := noteBuildID(data); id != "" {
			return id
		}
	}
	return ""
}

func noteBuildID(b []byte) string {
	for len(b) >= 12 {
		namesz := binary.LittleEndian.Uint32(b[0:])
		descsz := binary.LittleEndian.Uint32(b[4:])
		typ := binary.LittleEndian.Uint32(b[8:])
		nameEnd := 12 + (uint64(namesz)+3)&^3
		descEnd := nameEnd + (uint64(descsz)+3)&^3
		if descEnd > uint64(len(b)) {
			return ""
		}
		name := b[12 : 12+namesz]
		if typ == 3 && namesz == 4 && string(name) == "GNU\x00" {
			return hex.EncodeToString(b[nameEnd : nameEnd+uint64(descsz)])
		}
		b = b[descEnd:]
	}
	return ""
}

// HasFramePointers reports whether an object appears compiled with frame
// pointers: most of its FDEs that set up a frame (the CFA moves after the
// prologue; PLT stubs and frameless leaves excluded) set the CFA from rbp.
// Go executables (which keep frame pointers on amd64) report true; any
// other object without CFI reports false.
func HasFramePointers(f *elf.File) bool {
	if f.Section(".gopclntab") != nil || f.Section(".go.buildinfo") != nil {
		return true // Go's own CFI (in .debug_frame) is rsp-based, yet it keeps rbp chains
	}
	t, _ := parseTable(f)
	if t == nil || t.frFDE == 0 {
		return false
	}
	return t.fpFDE*2 > t.frFDE
}
