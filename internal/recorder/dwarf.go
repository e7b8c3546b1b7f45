package recorder

import (
	"debug/elf"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/unwind"
)

// Stack modes (--stack-mode).
const (
	StackAuto  = "auto"  // per process: unwind with CFI when its executable has no frame pointers
	StackFP    = "fp"    // frame-pointer walk in BPF for everything
	StackDwarf = "dwarf" // CFI unwinding in userspace for everything
)

// stackFlag marks a live block's stack id as a copied stack's sequence
// number (STACK_DWARF in bpf/memprof.h).
const stackFlag = heap.CopiedStack

// maxUnwindFrames bounds an unwound stack.
const maxUnwindFrames = 128

// maxCFIBuckets bounds the (process, stack, size) allocation counts kept
// for copied stacks, as the BPF allocs map bounds the others.
const maxCFIBuckets = 1 << 18

// dwarfStacks turns copied stacks into interned stacks: each sampled
// allocation's copy is unwound once, when its event arrives (the process
// and its mappings are alive then), and its sequence number maps to a
// canonical stack id shared by identical stacks.
type dwarfStacks struct {
	cache *unwind.Cache

	mu        sync.Mutex
	procs     map[int]*dwarfProc
	byKey     map[string]uint32
	keys      map[uint32]string // byKey reversed, for pruning
	stacks    map[uint32][]uint64
	truncated map[uint32]bool
	seqs      map[uint32]seqInfo
	allocs    map[heap.Key]uint64 // sampled allocations per (pid, canonical stack, size)
	next      uint32
	gen       uint64
	// Totals for the summary.
	unwound, truncatedN, noProc uint64
	bucketsFull                 uint64 // allocation counts lost to maxCFIBuckets
}

type seqInfo struct {
	id  uint32
	pid uint32
	gen uint64
}

type dwarfProc struct {
	up          *unwind.Process
	lastRefresh time.Time
	// uncovered holds code pages that stayed outside every known mapping
	// after a refresh (JIT code, vdso): no refresh is tried for them again.
	uncovered map[uint64]bool
}

// shouldRefresh tells whether a walk that stopped at pc may complete with
// fresh mappings.
func (d *dwarfStacks) shouldRefresh(p *dwarfProc, pc uint64) bool {
	if p.up.Covers(pc) {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return !p.uncovered[pc>>12] && len(p.uncovered) < 4096
}

func newDwarfStacks() *dwarfStacks {
	return &dwarfStacks{
		cache:     unwind.NewCache(256 << 20),
		procs:     map[int]*dwarfProc{},
		byKey:     map[string]uint32{},
		keys:      map[uint32]string{},
		stacks:    map[uint32][]uint64{},
		truncated: map[uint32]bool{},
		seqs:      map[uint32]seqInfo{},
		allocs:    map[heap.Key]uint64{},
		next:      stackFlag,
	}
}

// addProcess prepares unwinding for pid (its mappings now).
func (d *dwarfStacks) addProcess(pid int) error {
	maps, err := procmaps.Read(pid)
	if err != nil {
		return err
	}
	up, err := d.cache.Process(pid, maps)
	if up == nil {
		return err
	}
	d.mu.Lock()
	if old := d.procs[pid]; old != nil {
		old.up.Close()
	}
	d.procs[pid] = &dwarfProc{up: up, lastRefresh: time.Now(), uncovered: map[uint64]bool{}}
	d.mu.Unlock()
	return nil
}

// refresh picks up new mappings of pid.
func (d *dwarfStacks) refresh(pid int) {
	d.mu.Lock()
	p := d.procs[pid]
	d.mu.Unlock()
	if p == nil {
		return
	}
	if maps, err := procmaps.Read(pid); err == nil {
		p.up.Update(maps)
		p.lastRefresh = time.Now()
	}
}

// removeProcess forgets pid (its allocation counts go with it: they were
// read into the frozen state, or are dropped).
func (d *dwarfStacks) removeProcess(pid int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p := d.procs[pid]; p != nil {
		p.up.Close()
		delete(d.procs, pid)
	}
	for k := range d.allocs {
		if k.Pid == uint32(pid) {
			delete(d.allocs, k)
		}
	}
	for seq, info := range d.seqs {
		if info.pid == uint32(pid) {
			delete(d.seqs, seq)
		}
	}
}

var stackEventHeader = int(unsafe.Offsetof(mbpf.MemprofStackEvent{}.Data))

// handle unwinds one stack event.
func (d *dwarfStacks) handle(raw []byte) error {
	if len(raw) < stackEventHeader {
		return fmt.Errorf("short stack event (%d bytes)", len(raw))
	}
	// The header fields, copied into the generated type (the BPF side has
	// the host's byte order); the data is sliced from raw, not copied.
	var ev mbpf.MemprofStackEvent
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&ev)), stackEventHeader), raw[:stackEventHeader])
	tgid, seq, n, size := int(ev.Tgid), ev.Seq, int(ev.Len), ev.Size
	regs := unwind.Regs{IP: ev.Ip, SP: ev.Sp, BP: ev.Bp}
	if n > len(raw)-stackEventHeader {
		n = len(raw) - stackEventHeader
	}
	data := raw[stackEventHeader : stackEventHeader+n]

	d.mu.Lock()
	p := d.procs[tgid]
	d.mu.Unlock()
	var pcs []uint64
	truncated := true
	if p != nil {
		pcs, truncated = p.up.Unwind(regs, data, maxUnwindFrames)
		if truncated && len(pcs) > 0 && d.shouldRefresh(p, pcs[len(pcs)-1]) {
			// The walk stopped in code of a mapping not known yet (a
			// command started under memprof maps its libraries after the
			// probes are in place; dlopen): retry with fresh mappings.
			d.refresh(tgid)
			pcs, truncated = p.up.Unwind(regs, data, maxUnwindFrames)
			if truncated && len(pcs) > 0 && !p.up.Covers(pcs[len(pcs)-1]) {
				d.mu.Lock()
				p.uncovered[pcs[len(pcs)-1]>>12] = true
				d.mu.Unlock()
			}
		}
	} else {
		pcs = []uint64{regs.IP}
	}

	key := stackKey(pcs, truncated)
	d.mu.Lock()
	defer d.mu.Unlock()
	if p == nil {
		d.noProc++
	}
	d.unwound++
	if truncated {
		d.truncatedN++
	}
	id, ok := d.byKey[key]
	if !ok {
		id = d.next
		d.next++
		d.byKey[key] = id
		d.keys[id] = key
		d.stacks[id] = pcs
		if truncated {
			d.truncated[id] = true
		}
	}
	d.seqs[seq] = seqInfo{id: id, pid: uint32(tgid), gen: d.gen}
	k := heap.Key{Pid: uint32(tgid), StackID: id, Size: size}
	if _, ok := d.allocs[k]; !ok && len(d.allocs) >= maxCFIBuckets {
		d.bucketsFull++
		return nil
	}
	d.allocs[k]++
	return nil
}

func stackKey(pcs []uint64, truncated bool) string {
	b := make([]byte, 0, 8*len(pcs)+1)
	for _, pc := range pcs {
		b = binary.LittleEndian.AppendUint64(b, pc)
	}
	if truncated {
		b = append(b, 't')
	}
	return string(b)
}

// resolve rewrites a snapshot read from the maps: live blocks whose stack
// id is a copied stack's sequence number get its canonical stack, and the
// allocation counts of copied stacks (kept here, not in BPF) are added for
// the processes keep selects. Sequence numbers of blocks of those processes
// no longer live are forgotten.
func (d *dwarfStacks) resolve(s *heap.Snapshot, keep func(uint32) bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	gen := d.gen
	d.gen++
	seen := map[uint32]bool{}
	merged := map[heap.Key]*heap.Bucket{}
	var order []heap.Key
	add := func(k heap.Key) *heap.Bucket {
		b := merged[k]
		if b == nil {
			b = &heap.Bucket{Key: k}
			merged[k] = b
			order = append(order, k)
		}
		return b
	}
	for _, b := range s.Buckets {
		k := b.Key
		if k.StackID&stackFlag != 0 && k.StackID != heap.StackUnknown {
			seq := k.StackID &^ stackFlag
			seen[seq] = true
			if info, ok := d.seqs[seq]; ok {
				k.StackID = info.id
			} else {
				k.StackID = heap.StackUnknown // event lost or not read yet
			}
		}
		nb := add(k)
		nb.AllocCount += b.AllocCount
		nb.InuseCount += b.InuseCount
	}
	for k, n := range d.allocs {
		if keep != nil && !keep(k.Pid) {
			continue
		}
		add(k).AllocCount += n
	}
	s.Buckets = s.Buckets[:0]
	for _, k := range order {
		b := merged[k]
		if b.AllocCount < b.InuseCount {
			b.AllocCount = b.InuseCount
		}
		s.Buckets = append(s.Buckets, *b)
		if k.StackID&stackFlag != 0 && k.StackID != heap.StackUnknown {
			s.Stacks[k.StackID] = d.stacks[k.StackID]
			if d.truncated[k.StackID] {
				if s.Truncated == nil {
					s.Truncated = map[uint32]bool{}
				}
				s.Truncated[k.StackID] = true
			}
		}
	}
	// Only the processes read can tell which of their blocks are gone: the
	// sequence numbers of the others stay (a read of one exiting process
	// must not orphan the stacks of every other one).
	for seq, info := range d.seqs {
		if !seen[seq] && info.gen < gen && (keep == nil || keep(info.pid)) {
			delete(d.seqs, seq)
		}
	}
}

// prune forgets interned stacks that no live block (sequence number) and
// no allocation count refers to any more, so a long-running session's
// memory stays bounded by what is live and counted.
func (d *dwarfStacks) prune() (removed int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	refs := map[uint32]bool{}
	for _, info := range d.seqs {
		refs[info.id] = true
	}
	for k := range d.allocs {
		refs[k.StackID] = true
	}
	for id, key := range d.keys {
		if refs[id] {
			continue
		}
		delete(d.keys, id)
		delete(d.byKey, key)
		delete(d.stacks, id)
		delete(d.truncated, id)
		removed++
	}
	return removed
}

// size is the number of interned stacks.
func (d *dwarfStacks) size() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.stacks)
}

// stats reports unwinding totals and the allocation counts lost to the
// bucket bound.
func (d *dwarfStacks) stats() (unwound, truncated, bucketsFull uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.unwound, d.truncatedN, d.bucketsFull
}

// fpCache remembers, per object file, whether it was built with frame
// pointers (parsing its CFI to tell costs milliseconds for big objects).
type fpCache struct {
	mu sync.Mutex
	m  map[procmaps.FileID]bool
}

// hasFP reports whether the object at path (a host path) keeps frame
// pointers; unreadable objects count as having them.
func (c *fpCache) hasFP(path string) bool {
	id, err := procmaps.StatID(path)
	if err != nil {
		return true
	}
	c.mu.Lock()
	v, ok := c.m[id]
	c.mu.Unlock()
	if ok {
		return v
	}
	v = true
	if f, err := elf.Open(path); err == nil {
		v = unwind.HasFramePointers(f)
		f.Close()
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[procmaps.FileID]bool{}
	}
	c.m[id] = v
	c.mu.Unlock()
	return v
}

// cRuntime are the C and C++ runtimes' objects: their frames sit at the
// leaf (strdup, fopen, operator new, whose return memprof probes itself) or
// below the program's own outermost frame (thread start), where a
// frame-pointer walk loses nothing that matters, so they do not decide the
// stack mode.
var cRuntime = []string{"libc.so", "libc-", "ld-linux", "libm.so", "libpthread", "libdl.so", "librt.so",
	"libjemalloc", "libstdc++", "libgcc_s", "linux-vdso"}

// needsCFI reports whether a process mapping these objects (host paths)
// needs CFI unwinding: its executable or any library of its own was built
// without frame pointers, so the frame-pointer walk would lose or invent
// frames in the middle of its stacks (mixed stacks included: an executable
// with frame pointers calling such a library, or the reverse).
func (c *fpCache) needsCFI(paths []string) bool {
	for _, p := range paths {
		base := filepath.Base(p)
		runtime := false
		for _, r := range cRuntime {
			runtime = runtime || strings.HasPrefix(base, r)
		}
		if !runtime && !c.hasFP(p) {
			return true
		}
	}
	return false
}

// objectPaths lists the host paths of the executable file mappings of pid.
func objectPaths(pid int) []string {
	maps, err := procmaps.Read(pid)
	if err != nil {
		return nil
	}
	seen := map[procmaps.FileID]bool{}
	var out []string
	for i := range maps {
		m := &maps[i]
		if m.Exec() && m.IsFile() && !seen[m.ID()] {
			seen[m.ID()] = true
			out = append(out, procmaps.HostPath(pid, m.Path))
		}
	}
	return out
}

// hasFramePointers reports whether the executable of pid was built with
// frame pointers (read through its root, so containers work).
func hasFramePointers(pid int) bool {
	var c fpCache
	return c.hasFP(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "exe"))
}
