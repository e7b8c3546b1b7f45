// Package unwind recovers full user stacks of x86-64 processes from a copy of
// the top of the user stack plus the registers IP, SP and BP, using each
// mapped object's call-frame information (.eh_frame, else .debug_frame) — the
// approach of perf --call-graph dwarf and heapprofd. It works for code built
// without frame pointers and falls back to the frame-pointer rule for code
// without CFI.
package unwind

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/memprof/memprof/internal/procmaps"
)

// Regs are the user registers captured with the stack.
type Regs struct{ IP, SP, BP uint64 }

// DefaultMaxFrames is used by Unwind when maxFrames <= 0.
const DefaultMaxFrames = 128

// Process is the view of one process: its executable mappings and their open
// files. Files are opened when the mapping is added, so a stack captured
// before the process exits can be unwound after it has gone.
type Process struct {
	c   *Cache
	pid int

	mu   sync.RWMutex
	maps []*pmap // sorted by start, non-overlapping
	objs map[procmaps.FileID]*object
}

type object struct {
	name string // path in the process, for reports
	file *os.File
	ef   *elf.File
	key  string
	ent  atomic.Pointer[cached]
	refs int // mappings using it
}

type pmap struct {
	start, end uint64
	bias       uint64 // ELF virtual address = pc - bias
	obj        *object
	id         procmaps.FileID
	offset     uint64
}

// Process returns the view of process pid over maps (from procmaps.Read).
// Only executable file-backed mappings are used. The Process is returned even
// when some mappings could not be opened or parsed; err then lists them, and
// frames in those mappings use the frame-pointer rule or end the walk.
func (c *Cache) Process(pid int, maps []procmaps.Mapping) (*Process, error) {
	p := &Process{c: c, pid: pid, objs: map[procmaps.FileID]*object{}}
	err := p.Update(maps)
	return p, err
}

// Update adds the executable mappings in maps that the Process does not know
// yet (after dlopen). A known mapping overlapped by a different new mapping
// is replaced; known mappings absent from maps but not overlapped are kept,
// so stacks captured before a dlclose still unwind.
func (p *Process) Update(maps []procmaps.Mapping) error {
	var errs []error
	var added []*pmap
	p.mu.RLock()
	known := make(map[[3]uint64]bool, len(p.maps))
	for _, m := range p.maps {
		known[[3]uint64{m.start, m.end, m.id.Inode}] = true
	}
	p.mu.RUnlock()

	for i := range maps {
		m := &maps[i]
		if !m.Exec() || !m.IsFile() || m.End <= m.Start {
			continue
		}
		if known[[3]uint64{m.Start, m.End, m.Inode}] {
			continue
		}
		pm, err := p.newMapping(m)
		if err != nil {
			errs = append(errs, err)
		}
		if pm != nil {
			added = append(added, pm)
		}
	}
	if len(added) == 0 {
		return errors.Join(errs...)
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	var kept []*pmap
	for _, old := range p.maps {
		overlapped := false
		for _, n := range added {
			if old.start < n.end && n.start < old.end {
				overlapped = true
				break
			}
		}
		if overlapped {
			p.release(old)
		} else {
			kept = append(kept, old)
		}
	}
	p.maps = append(kept, added...)
	sort.Slice(p.maps, func(i, j int) bool { return p.maps[i].start < p.maps[j].start })
	return errors.Join(errs...)
}

// newMapping opens (or reuses) the object of m and computes its load bias.
func (p *Process) newMapping(m *procmaps.Mapping) (*pmap, error) {
	id := m.ID()
	p.mu.Lock()
	obj := p.objs[id]
	if obj == nil {
		f, err := procmaps.Open(p.pid, m)
		if err != nil {
			p.mu.Unlock()
			return nil, fmt.Errorf("unwind: open mapping %x-%x of process %d: %w", m.Start, m.End, p.pid, err)
		}
		ef, key, err := ParseObject(f, m.Path)
		if err != nil {
			f.Close()
			p.mu.Unlock()
			return nil, fmt.Errorf("unwind: parse ELF %s of process %d: %w", m.Path, p.pid, err)
		}
		obj = &object{file: f, ef: ef, key: key, name: m.Path}
		p.objs[id] = obj
	}
	obj.refs++
	p.mu.Unlock()

	pm := &pmap{start: m.Start, end: m.End, obj: obj, id: id, offset: m.Offset}
	bias, ok := loadBias(obj.ef, m)
	if !ok {
		p.mu.Lock()
		p.releaseObj(id, obj)
		p.mu.Unlock()
		return nil, fmt.Errorf("unwind: no PT_LOAD segment of %s covers file offset %#x (mapping %x-%x of process %d)",
			m.Path, m.Offset, m.Start, m.End, p.pid)
	}
	pm.bias = bias
	// Load the table now so the object is parsed while its file is certainly readable.
	if _, err := p.c.get(obj.key, obj.name, obj.ef); err != nil {
		return pm, fmt.Errorf("unwind: call-frame information of %s: %w", m.Path, err)
	}
	return pm, nil
}

// loadBias returns the value to subtract from a pc in m to get the ELF
// virtual address, using the PT_LOAD segment that maps m's file offset.
func loadBias(ef *elf.File, m *procmaps.Mapping) (uint64, bool) {
	size := m.End - m.Start
	var best *elf.Prog
	for _, pr := range ef.Progs {
		if pr.Type != elf.PT_LOAD || pr.Filesz == 0 {
			continue
		}
		if pr.Off < m.Offset+size && m.Offset < pr.Off+pr.Filesz {
			if best == nil || (pr.Flags&elf.PF_X != 0 && best.Flags&elf.PF_X == 0) {
				best = pr
			}
		}
	}
	if best == nil {
		return 0, false
	}
	// vaddr = (pc - Start + Offset) - Off + Vaddr
	return m.Start - m.Offset + best.Off - best.Vaddr, true
}

func (p *Process) release(pm *pmap) { p.releaseObj(pm.id, pm.obj) }

func (p *Process) releaseObj(id procmaps.FileID, obj *object) {
	obj.refs--
	if obj.refs <= 0 {
		obj.file.Close()
		delete(p.objs, id)
	}
}

// Close releases the files the Process holds open.
func (p *Process) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, o := range p.objs {
		o.file.Close()
		delete(p.objs, id)
	}
	p.maps = nil
	return nil
}

// Mappings reports how many executable mappings the Process knows.
func (p *Process) Mappings() int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.maps)
}

// Covers reports whether pc lies in an executable mapping the Process
// knows: a walk that stopped at a pc it does not cover may complete after
// Update with the process's current mappings.
func (p *Process) Covers(pc uint64) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.findMap(pc) != nil
}

// findMap returns the mapping containing pc (caller holds p.mu).
func (p *Process) findMap(pc uint64) *pmap {
	maps := p.maps
	i := sort.Search(len(maps), func(i int) bool { return maps[i].end > pc })
	if i < len(maps) && maps[i].start <= pc {
		return maps[i]
	}
	return nil
}

// table returns the parsed table of obj, reloading it if it was evicted.
func (p *Process) table(obj *object) *table {
	e := obj.ent.Load()
	if e == nil || (e.evicted.Load() && !e.oversize) {
		e, _ = p.c.get(obj.key, obj.name, obj.ef) // errors were reported when the mapping was added
		if e == nil {
			return nil
		}
		obj.ent.Store(e)
	} else {
		p.c.touch(e)
	}
	return e.tab
}

// stackReader reads 8-byte words from the stack copy.
type stackReader struct {
	base  uint64
	stack []byte
}

func (s *stackReader) read(addr uint64) (uint64, bool) {
	off := addr - s.base
	if addr < s.base || off > uint64(len(s.stack)) || uint64(len(s.stack))-off < 8 {
		return 0, false
	}
	return binary.LittleEndian.Uint64(s.stack[off:]), true
}

func (s *stackReader) contains(addr uint64) bool {
	return addr >= s.base && addr-s.base < uint64(len(s.stack))
}

// Unwind returns the program counters of the stack, starting with regs.IP,
// at most maxFrames of them (DefaultMaxFrames if maxFrames <= 0). stack is a
// copy of user memory starting at regs.SP. truncated is true when the walk
// stopped before reaching the outermost frame: no CFI for a pc and no usable
// frame pointer, a read past the copied stack, a pc outside every mapping, a
// rule it cannot evaluate, or maxFrames reached. The pcs returned are always
// ones it could justify; a doubtful frame ends the walk instead.
func (p *Process) Unwind(regs Regs, stack []byte, maxFrames int) (pcs []uint64, truncated bool) {
	if maxFrames <= 0 {
		maxFrames = DefaultMaxFrames
	}
	return p.AppendUnwind(make([]uint64, 0, min(maxFrames, 32)), regs, stack, maxFrames)
}

// AppendUnwind is Unwind appending the pcs to dst (reuse a buffer to avoid
// the allocation); at most maxFrames frames are appended.
func (p *Process) AppendUnwind(dst []uint64, regs Regs, stack []byte, maxFrames int) (pcs []uint64, truncated bool) {
	if maxFrames <= 0 {
		maxFrames = DefaultMaxFrames
	}
	pcs = dst
	limit := len(dst) + maxFrames
	st := stackReader{base: regs.SP, stack: stack}
	f := frame{pc: regs.IP, sp: regs.SP, bp: regs.BP, bpValid: true, exact: true}

	p.mu.RLock()
	defer p.mu.RUnlock()
	for {
		if f.pc == 0 {
			return pcs, false
		}
		pcs = append(pcs, f.pc)
		if len(pcs) >= limit {
			return pcs, true
		}
		lookup := f.lookupPC()
		m := p.findMap(lookup)
		if m == nil {
			return pcs, true
		}
		var tab *table
		if tab = p.table(m.obj); tab == nil {
			tab = &table{} // no table: the frame-pointer rule
		}
		var res stepResult
		f, res = tab.step(lookup-m.bias, f, &st)
		switch res {
		case stepEnd:
			return pcs, false
		case stepStop:
			return pcs, true
		}
	}
}

// FramePointers walks the stack by the frame-pointer rule alone (what the BPF
// side's frame-pointer walk does), for comparison and for the "fp" stack
// mode. It stops (truncated) when rbp leaves the copied stack.
func FramePointers(regs Regs, stack []byte, maxFrames int) (pcs []uint64, truncated bool) {
	if maxFrames <= 0 {
		maxFrames = DefaultMaxFrames
	}
	st := stackReader{base: regs.SP, stack: stack}
	pc, sp, bp := regs.IP, regs.SP, regs.BP
	for {
		if pc == 0 {
			return pcs, false
		}
		pcs = append(pcs, pc)
		if len(pcs) >= maxFrames {
			return pcs, true
		}
		if bp == 0 {
			return pcs, false // outermost frame: _start and thread starts clear rbp
		}
		if bp < sp || bp&7 != 0 || !st.contains(bp) {
			return pcs, true
		}
		ra, ok1 := st.read(bp + 8)
		nbp, ok2 := st.read(bp)
		if !ok1 || !ok2 {
			return pcs, true
		}
		sp, bp, pc = bp+16, nbp, ra
	}
}
