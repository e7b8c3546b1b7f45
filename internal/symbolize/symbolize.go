// Package symbolize turns the absolute return addresses of a process's stacks
// into pprof locations: function names (C++ and Rust demangled), source files and lines
// with inlined frames, and mappings carrying build IDs and file offsets so
// pprof can re-symbolize.
//
// A Process is a snapshot of one process's executable mappings whose files are
// held open, so symbolization keeps working after the process exits and for
// processes in other mount namespaces. Parsed objects live in a Cache shared by
// every process, keyed by GNU build ID and content hash (so one tenant's file
// cannot stand in for another's) and bounded by an LRU. Every file is read as
// hostile input through package targetfs.
package symbolize

import (
	"container/list"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/pprofout"
)

// DefaultMaxObjects is the object cap used when Options.MaxObjects is 0.
const DefaultMaxObjects = 256

// Options configure a Cache.
type Options struct {
	// MaxObjects caps the parsed object files kept (LRU); 0 means
	// DefaultMaxObjects.
	MaxObjects int
	// DebugDirs are searched for separate debug files, inside the process's
	// root first and then on the host; nil means ["/usr/lib/debug"].
	DebugDirs []string
}

// Cache holds parsed object files (symbols, line tables) keyed by GNU build
// ID, content hash and debug file (objKey). It is shared by every process,
// safe for concurrent use, and bounded by Options.MaxObjects.
type Cache struct {
	opts  Options
	mu    sync.Mutex
	lru   *list.List // of *object, most recently used first
	byKey map[objKey]*list.Element
}

// NewCache returns an empty cache.
func NewCache(opts Options) *Cache {
	if opts.MaxObjects <= 0 {
		opts.MaxObjects = DefaultMaxObjects
	}
	if opts.DebugDirs == nil {
		opts.DebugDirs = []string{"/usr/lib/debug"}
	}
	return &Cache{opts: opts, lru: list.New(), byKey: map[objKey]*list.Element{}}
}

// Stats returns the number of parsed objects held and an approximation of
// the memory they use.
func (c *Cache) Stats() (objects int, approxBytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for e := c.lru.Front(); e != nil; e = e.Next() {
		approxBytes += e.Value.(*object).approxBytes()
	}
	return c.lru.Len(), approxBytes
}

func (c *Cache) lookup(key objKey) *object {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.byKey[key]; ok {
		c.lru.MoveToFront(e)
		return e.Value.(*object)
	}
	return nil
}

// insert adds o (unless another goroutine added the same key meanwhile) and
// evicts the least recently used objects over the cap.
func (c *Cache) insert(o *object) *object {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.byKey[o.key]; ok {
		c.lru.MoveToFront(e)
		return e.Value.(*object)
	}
	c.byKey[o.key] = c.lru.PushFront(o)
	for c.lru.Len() > c.opts.MaxObjects {
		last := c.lru.Back()
		c.lru.Remove(last)
		delete(c.byKey, last.Value.(*object).key)
	}
	return o
}

// fileRef is one mapped file of a process, held open.
type fileRef struct {
	id      procmaps.FileID
	path    string            // as the process sees it
	f       *os.File          // nil if it could not be opened
	dbg     *os.File          // separate debug file, if one was found
	fr, dr  *io.SectionReader // f and dbg, bounded by their size when opened
	key     objKey
	keyed   bool // key is set (the file was identified)
	openErr error

	hasFunctions, hasLines bool
}

// pmap is one executable mapping of the process.
type pmap struct {
	m   procmaps.Mapping
	pm  *pprofout.Mapping
	ref *fileRef
	seq int // order of discovery
	// gone: absent from the process's maps at the last Refresh (kept
	// for the samples that refer to it, see retain.go); goneAt orders
	// such mappings by when they went.
	gone   bool
	goneAt uint64
}

// Process is a symbolization snapshot of one process.
type Process struct {
	c   *Cache
	pid int

	// refreshMu serializes Refresh (the recorder calls it from its poll
	// loop and from its stack-event reader), so a file is opened once.
	refreshMu sync.Mutex

	mu     sync.Mutex
	exe    string  // path of the main executable as the process sees it
	maps   []*pmap // active mappings sorted by start
	all    map[[4]uint64]*pmap
	files  map[procmaps.FileID]*fileRef
	locs   map[uint64]*pprofout.Location
	seq    int
	closed bool
	// goneSeq numbers unmapped mappings; dropped counts those dropped by
	// MaxGoneMappings.
	goneSeq, dropped uint64
}

// Snapshot reads /proc/PID/maps now and opens the file of every executable
// file-backed mapping now, so symbolization still works after the process
// exits. Close the Process to release the files.
func (c *Cache) Snapshot(pid int) (*Process, error) {
	p := &Process{
		c:     c,
		pid:   pid,
		all:   map[[4]uint64]*pmap{},
		files: map[procmaps.FileID]*fileRef{},
		locs:  map[uint64]*pprofout.Location{},
	}
	if err := p.Refresh(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// Pid is the process id the snapshot was taken of.
func (p *Process) Pid() int { return p.pid }

// Refresh re-reads the process's maps and adds newly mapped objects (dlopen).
// Mappings seen before are kept with their files open after they leave the
// process (dlclose), so addresses recorded before still symbolize, until
// Release finds no sample referring to them or MaxGoneMappings drops them.
func (p *Process) Refresh() error {
	p.refreshMu.Lock()
	defer p.refreshMu.Unlock()
	ms, err := procmaps.Read(p.pid)
	if err != nil {
		return fmt.Errorf("symbolize: snapshot of process %d failed (has it exited?): %w", p.pid, err)
	}
	if exe, err := os.Readlink(filepath.Join(procmaps.ProcRoot, strconv.Itoa(p.pid), "exe")); err == nil {
		p.mu.Lock()
		if p.exe == "" {
			p.exe = strings.TrimSuffix(exe, " (deleted)")
		}
		p.mu.Unlock()
	}
	var added []*pmap
	present := map[[4]uint64]bool{}
	for i := range ms {
		m := ms[i]
		if !m.Exec() || !m.IsFile() {
			continue
		}
		k := [4]uint64{m.Start, m.End, m.Offset, m.Inode}
		present[k] = true
		p.mu.Lock()
		_, seen := p.all[k]
		ref := p.files[m.ID()]
		p.mu.Unlock()
		if seen {
			continue
		}
		if ref == nil {
			ref = p.openFile(&m)
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				ref.close()
				return fmt.Errorf("symbolize: process %d snapshot used after Close", p.pid)
			}
			p.files[m.ID()] = ref
			p.mu.Unlock()
		}
		pm := &pprofout.Mapping{
			Start: m.Start, Limit: m.End, Offset: m.Offset, File: m.Path,
			BuildID:      ref.key.buildID,
			HasFunctions: ref.hasFunctions, HasFilenames: ref.hasLines, HasLineNumbers: ref.hasLines,
		}
		added = append(added, &pmap{m: m, pm: pm, ref: ref})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range added {
		p.seq++
		a.seq = p.seq
		p.all[[4]uint64{a.m.Start, a.m.End, a.m.Offset, a.m.Inode}] = a
		// A new mapping replaces older ones it overlaps (dlclose + dlopen
		// reusing the range); forget cached locations in that range.
		kept := p.maps[:0]
		for _, old := range p.maps {
			if old.m.Start < a.m.End && a.m.Start < old.m.End {
				for addr := range p.locs {
					if addr >= old.m.Start && addr < old.m.End {
						delete(p.locs, addr)
					}
				}
				continue
			}
			kept = append(kept, old)
		}
		p.maps = append(kept, a)
	}
	sort.Slice(p.maps, func(i, j int) bool { return p.maps[i].m.Start < p.maps[j].m.Start })
	p.markGone(present)
	return nil
}

// openFile opens a mapped file (procmaps.Open: confined to the process,
// non-blocking, regular, the very device and inode mapped), identifies it by
// build ID and content (objKey), finds its separate debug file if it lacks
// symbols or DWARF, and loads (or finds cached) its object, so the
// mapping's flags are known. Any failure is kept in ref.openErr, naming the
// file; the process's other objects are unaffected.
func (p *Process) openFile(m *procmaps.Mapping) *fileRef {
	ref := &fileRef{id: m.ID(), path: m.Path}
	f, err := procmaps.Open(p.pid, m)
	if err != nil {
		ref.openErr = err
		return ref
	}
	ref.f = f
	st, err := targetfs.StatOf(f)
	if err != nil {
		ref.openErr = err
		return ref
	}
	ref.fr = io.NewSectionReader(f, 0, st.Size)
	// Identification runs under a deadline; if it is abandoned, whatever it
	// opens late is closed by it (abandoned is set under mu).
	var (
		mu        sync.Mutex
		abandoned bool
		key       objKey
		dbg       *os.File
		dst       targetfs.Stat
	)
	err = targetfs.Guard(m.Path, 0, func() error {
		ef, err := newELF(ref.fr)
		if err != nil {
			return fmt.Errorf("%s of process %d is not a readable ELF file: %w", m.Path, p.pid, err)
		}
		digest, err := targetfs.Digest(f)
		if err != nil {
			return err
		}
		k := objKey{buildID: readBuildID(ef), digest: digest}
		var df *os.File
		var dfs targetfs.Stat
		if !hasDebugInfo(ef) || !hasSymtab(ef) {
			df, dfs = findDebugFile(ef, k.buildID, m.Path, procmaps.RootPath(p.pid), p.c.opts.DebugDirs)
			k.dbg = dfs
		}
		mu.Lock()
		defer mu.Unlock()
		if abandoned {
			if df != nil {
				df.Close()
			}
			return nil
		}
		key, dbg, dst = k, df, dfs
		return nil
	})
	mu.Lock()
	abandoned = true
	mu.Unlock()
	if err != nil {
		if dbg != nil {
			dbg.Close()
		}
		ref.openErr = err
		return ref
	}
	ref.key, ref.keyed = key, true
	if dbg != nil {
		ref.dbg, ref.dr = dbg, io.NewSectionReader(dbg, 0, dst.Size)
	}
	o, err := p.load(ref)
	if err != nil {
		ref.openErr = err
		return ref
	}
	ref.hasFunctions = len(o.syms) > 0
	ref.hasLines = o.hasLines()
	return ref
}

// load returns ref's object from the cache, or parses it (under
// targetfs.Guard: a panic or a stuck parse fails this object only) and
// caches it.
func (p *Process) load(ref *fileRef) (*object, error) {
	if o := p.c.lookup(ref.key); o != nil {
		return o, nil
	}
	var (
		mu sync.Mutex
		o  *object
	)
	err := targetfs.Guard(ref.path, 0, func() error {
		obj, err := loadObject(ref.key, ref.fr, ref.dr, ref.path)
		mu.Lock()
		o = obj
		mu.Unlock()
		return err
	})
	if err != nil {
		return nil, err
	}
	mu.Lock()
	obj := o
	mu.Unlock()
	return p.c.insert(obj), nil
}

// object returns ref's parsed object, reparsing it from the held file if
// the cache evicted it.
func (p *Process) object(ref *fileRef) *object {
	if ref.f == nil || ref.openErr != nil || !ref.keyed {
		return nil
	}
	o, err := p.load(ref)
	if err != nil {
		return nil
	}
	return o
}

func (r *fileRef) close() {
	if r.f != nil {
		r.f.Close()
	}
	if r.dbg != nil {
		r.dbg.Close()
	}
}

// Locate symbolizes absolute return addresses of the process. The same
// address always yields the same *Location, and addresses of one mapping share
// its *Mapping. Addresses are return addresses: functions and lines are
// looked up at addr-1, while Location.Addr keeps addr.
func (p *Process) Locate(addrs []uint64) []*pprofout.Location {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*pprofout.Location, len(addrs))
	for i, a := range addrs {
		if l, ok := p.locs[a]; ok {
			out[i] = l
			continue
		}
		l := p.locate(a)
		p.locs[a] = l
		out[i] = l
	}
	return out
}

// Covers reports whether every address of addrs lies in an executable
// mapping the snapshot knows (false: Refresh may find the object).
func (p *Process) Covers(addrs []uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range addrs {
		j := sort.Search(len(p.maps), func(j int) bool { return p.maps[j].m.End > a })
		if j >= len(p.maps) || a < p.maps[j].m.Start {
			return false
		}
	}
	return true
}

func (p *Process) locate(addr uint64) *pprofout.Location {
	loc := &pprofout.Location{Addr: addr}
	j := sort.Search(len(p.maps), func(j int) bool { return p.maps[j].m.End > addr })
	if j >= len(p.maps) || addr < p.maps[j].m.Start {
		return loc
	}
	pm := p.maps[j]
	loc.Mapping = pm.pm
	if p.closed {
		return loc
	}
	o := p.object(pm.ref)
	if o == nil {
		return loc
	}
	pc := addr
	if pc > pm.m.Start {
		pc-- // inside the call instruction
	}
	off := pc - pm.m.Start + pm.m.Offset
	v, ok := o.fileToVaddr(off)
	if !ok {
		if !o.exec {
			return loc
		}
		v = pc
	}
	loc.Lines = o.lines(v, o.dwTables(pm.ref.fr, pm.ref.dr))
	return loc
}

// Mappings returns the executable mappings seen so far, the main executable
// first, then by address.
func (p *Process) Mappings() []*pprofout.Mapping {
	p.mu.Lock()
	defer p.mu.Unlock()
	all := make([]*pmap, 0, len(p.all))
	for _, m := range p.all {
		all = append(all, m)
	}
	sort.Slice(all, func(i, j int) bool {
		ei, ej := all[i].m.Path == p.exe, all[j].m.Path == p.exe
		if ei != ej {
			return ei
		}
		if all[i].m.Start != all[j].m.Start {
			return all[i].m.Start < all[j].m.Start
		}
		return all[i].seq < all[j].seq
	})
	out := make([]*pprofout.Mapping, len(all))
	for i, m := range all {
		out[i] = m.pm
	}
	return out
}

// Errors lists the mapped files that could not be opened or parsed (their
// addresses get a Mapping but no function names) and objects whose DWARF
// could not be read (function names only).
func (p *Process) Errors() []error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for _, r := range p.files {
		if r.openErr != nil {
			errs = append(errs, r.openErr)
			continue
		}
		if o := p.c.lookup(r.key); o != nil {
			o.dwMu.Lock()
			err := o.dwErr
			o.dwMu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("reading DWARF of %s failed, so only function names are shown (is the file or its debug file corrupt?): %w", r.path, err))
			}
		}
	}
	return errs
}

// Close releases the files held by the snapshot. Locations already returned
// stay valid; later Locate calls return unsymbolized locations.
func (p *Process) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	for _, r := range p.files {
		r.close()
	}
	p.locs = map[uint64]*pprofout.Location{}
}
