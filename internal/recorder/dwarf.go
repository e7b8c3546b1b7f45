package recorder

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/internal/unwind"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// Stack modes (--stack-mode).
const (
	StackCFI   = "cfi"   // CFI walk in BPF for everything (default); frame pointers where an object has no CFI
	StackFP    = "fp"    // frame-pointer walk in BPF for everything
	StackDwarf = "dwarf" // stack copies unwound with CFI in userspace for everything
	StackAuto  = "auto"  // per process: stack copies when its own code lacks frame pointers, else fp
)

var stackModes = map[string]mbpf.MemprofStackMode{
	StackCFI: mbpf.MemprofStackModeSM_CFI, StackFP: mbpf.MemprofStackModeSM_FP,
	StackDwarf: mbpf.MemprofStackModeSM_DWARF, StackAuto: mbpf.MemprofStackModeSM_AUTO,
}

// stackFlag marks a live block's stack id as a copied stack's sequence
// number (STACK_DWARF in bpf/memprof.h).
const stackFlag = heap.CopiedStack

// copiedStack tells the ids of copied stacks (sequence numbers, canonical
// ids once resolved) from the others.
func copiedStack(id uint64) bool {
	return !heap.CFIStack(id) && id&stackFlag != 0 && id != heap.StackUnknown
}

// maxUnwindFrames bounds an unwound stack.
const maxUnwindFrames = 128

// maxCFIBuckets bounds the (process, stack, size) allocation counts kept
// for copied stacks, as the BPF allocs map bounds the others.
const maxCFIBuckets = 1 << 18

// dwarfStacks turns copied stacks into interned stacks: each sampled
// allocation's copy is unwound once, when its event arrives (the process
// and its mappings are alive then), and its sequence number maps to a
// canonical stack id shared by identical stacks.
//
// In cfi mode (objs.Unwind set) stacks are walked in BPF from the tables of
// the store, which learns each target's mappings here; only the samples
// whose walk met code not described yet (a library just mapped, a table
// still being built) are copied, and unwound here with a userspace
// unwinder made for the process on its first such copy.
type dwarfStacks struct {
	cache *unwind.Cache
	objs  *bpfload.Objects
	store *unwindtable.Store // cfi mode; nil otherwise
	// targets are this tier's processes in store (cfi mode): the store
	// rescans those whose walks met code mapped since (dlopen).
	targets *unwindtable.Targets
	// mapped, if set, is called after a walk made the unwinder re-read a
	// process's mappings (a library mapped since, such as a dlopen): the
	// symbolizer takes them at once too, so the library's frames still
	// resolve if it is unloaded (dlclose) before the profile is taken.
	mapped func(pid int)

	mu        sync.Mutex
	procs     map[int]*dwarfProc
	cfiProcs  map[int]bool      // cfi mode: processes given to the store
	rescanned map[int]time.Time // cfi mode: last rescan prompted by a stack copy
	byKey     map[string]uint64
	keys      map[uint64]string // byKey reversed, for pruning
	stacks    map[uint64][]uint64
	truncated map[uint64]bool
	seqs      map[uint32]seqInfo
	allocs    map[heap.Key]uint64 // sampled allocations per (pid, canonical stack, size)
	next      uint64
	gen       uint64
	// handling counts events being unwound (handle): a read waits for
	// them, so a copy taken from the ring buffer is never missed.
	handling atomic.Int32
	// Totals for the summary.
	unwound, truncatedN, noProc uint64
	bucketsFull                 uint64 // allocation counts lost to maxCFIBuckets
}

type seqInfo struct {
	id  uint64
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

// newDwarfStacks returns the stack state of a session; mapped (may be nil)
// is called for a process whose mappings the unwinders re-read.
func newDwarfStacks(objs *bpfload.Objects, mapped func(pid int)) *dwarfStacks {
	d := &dwarfStacks{
		mapped:    mapped,
		cache:     unwind.NewCache(256 << 20),
		objs:      objs,
		procs:     map[int]*dwarfProc{},
		cfiProcs:  map[int]bool{},
		rescanned: map[int]time.Time{},
		byKey:     map[string]uint64{},
		keys:      map[uint64]string{},
		stacks:    map[uint64][]uint64{},
		truncated: map[uint64]bool{},
		seqs:      map[uint32]seqInfo{},
		allocs:    map[heap.Key]uint64{},
		next:      stackFlag,
	}
	if objs != nil && objs.Unwind != nil {
		d.store = objs.Unwind
		// A walk met code the tables do not describe (a dlopen): the store
		// rescans the process (every unwindtable.StaleInterval; its samples
		// are copied for userspace unwinding meanwhile) and the symbolizer
		// takes the new mappings too, so the library's frames resolve even
		// if it is unloaded before the profile.
		d.targets = d.store.NewTargets(mapped, nil)
	}
	return d
}

// rescanInterval rate-limits the rescans of a process prompted by its
// stack copies (cfi mode).
const rescanInterval = 2 * time.Millisecond

// close forgets the tier's processes in the store (cfi mode).
func (d *dwarfStacks) close() {
	if d.targets != nil {
		d.targets.Close()
	}
}

// tableWait bounds how long a target waits for its unwind tables before
// its probes fire (pid targets) or it runs on (commands stopped at their
// exec); samples in code whose table is not ready by then are copied.
const tableWait = 3 * time.Second

// prepare gives pid's mappings to the store and builds their unwind
// tables (cfi mode), waiting up to tableWait, so that its first samples
// find them ready. A target that is not attached after all is forgotten
// with removeProcess.
func (d *dwarfStacks) prepare(pid int) {
	if d.store != nil {
		_ = d.addProcess(pid, nil) // errors: reported when setupStacks adds it again
	}
}

// addProcess prepares unwinding for pid (its mappings now). objects are
// host paths of objects it is about to map (a command stopped at its exec:
// its libraries), nil if none: in cfi mode their tables are built now, and
// the call waits up to tableWait for the tables.
func (d *dwarfStacks) addProcess(pid int, objects []objectFile) error {
	if d.store != nil {
		paths := make([]string, len(objects))
		for i, o := range objects {
			paths[i] = o.path
		}
		d.mu.Lock()
		d.cfiProcs[pid] = true
		d.mu.Unlock()
		return d.targets.Add(pid, paths, tableWait)
	}
	return d.addUnwinder(pid)
}

// addUnwinder prepares userspace unwinding of stack copies for pid.
func (d *dwarfStacks) addUnwinder(pid int) error {
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
	cfi := d.cfiProcs[pid]
	d.mu.Unlock()
	if cfi {
		// The BPF walk marks the process when it meets code mapped since
		// (refreshLoop); a rescan here catches code that no sample has
		// met yet, so its table is ready before it is needed. The store
		// is told only when the executable mappings changed.
		_ = d.targets.Rescan(pid) // a mapping it cannot read ends its walks there, counted
	}
	if p == nil {
		return
	}
	if maps, err := procmaps.Read(pid); err == nil {
		_ = p.up.Update(maps) // objects it cannot open end walks there, counted as truncated
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
	delete(d.rescanned, pid)
	if d.cfiProcs[pid] {
		delete(d.cfiProcs, pid)
		_ = d.targets.Remove(pid) // the process is gone: its entry may be too
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
	d.handling.Add(1)
	defer d.handling.Add(-1)
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
	cfi := d.cfiProcs[tgid]
	lazy := p == nil && cfi
	rescan := cfi && time.Since(d.rescanned[tgid]) >= rescanInterval
	if rescan {
		d.rescanned[tgid] = time.Now()
	}
	d.mu.Unlock()
	if rescan {
		// cfi mode: a copy means the BPF walk met code not described yet
		// (mapped since the last scan, or a table still being built):
		// rescan now, so the next samples are walked in BPF. A process
		// whose rescans keep finding nothing new (a corrupt stack) is
		// backed off by the store.
		d.targets.Prompted(tgid)
	}
	if lazy {
		// cfi mode: the first copy of this process (its walk met code not
		// described yet).
		if d.addUnwinder(tgid) == nil {
			d.mu.Lock()
			p = d.procs[tgid]
			d.mu.Unlock()
		}
	}
	var pcs []uint64
	truncated := true
	if p != nil {
		pcs, truncated = p.up.Unwind(regs, data, maxUnwindFrames)
		if truncated && len(pcs) > 0 && d.shouldRefresh(p, pcs[len(pcs)-1]) {
			// The walk stopped in code of a mapping not known yet (a
			// command started under memprof maps its libraries after the
			// probes are in place; dlopen): retry with fresh mappings.
			d.refresh(tgid)
			if d.mapped != nil {
				d.mapped(tgid)
			}
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
	// A copy being unwound (the first of a process in cfi mode prepares
	// its userspace unwinder: tens of milliseconds) is waited for.
	for i := 0; i < 500 && d.handling.Load() > 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
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
		if copiedStack(k.StackID) {
			seq := uint32(k.StackID &^ stackFlag)
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
		if copiedStack(k.StackID) {
			s.Stacks[k.StackID] = d.stacks[k.StackID]
			if d.truncated[k.StackID] {
				if s.Truncated == nil {
					s.Truncated = map[uint64]bool{}
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
	refs := map[uint64]bool{}
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

// tableStats reports the unwind tables held: the store's in cfi mode
// (rows and rules in BPF maps), else the userspace unwinder's.
func (d *dwarfStacks) tableStats() (tables int, bytes int64) {
	if d.store != nil {
		st := d.store.Stats()
		return st.Objects, st.Bytes + st.ProcBytes
	}
	return d.cache.Stats()
}

// cfiStats sums the BPF walks' outcomes (cfi mode): walks truncated (those
// that fell back to a stack copy are counted by the copy's unwinding
// instead), stopped at a table not built yet, and stacks not stored
// (uw_stacks hash collision or full).
func (d *dwarfStacks) cfiStats() (truncated, pending, lost uint64, err error) {
	w, err := unwindtable.ReadWalkStats(d.objs.UwStats)
	if err != nil {
		return 0, 0, 0, err
	}
	in, err := unwindtable.ReadInternStats(d.objs.UwInternStats)
	if err != nil {
		return 0, 0, 0, err
	}
	c, err := d.objs.ReadCounters()
	if err != nil {
		return 0, 0, 0, err
	}
	truncated = w.Truncated()
	if copies := c.StackCopies; copies <= truncated {
		truncated -= copies // walks that fell back to a copy
	}
	return truncated, w.Pending, in.Collisions + in.Full + w.Busy, nil
}

// comments are the profile's cfi-mode figures.
func (d *dwarfStacks) comments() []string {
	if d.store == nil {
		return nil
	}
	tr, pend, lost, err := d.cfiStats()
	if err != nil {
		return []string{"memprof error: " + err.Error()}
	}
	st := d.store.Stats()
	var walks, noMapping uint64
	if w, err := unwindtable.ReadWalkStats(d.objs.UwStats); err == nil {
		walks, noMapping = w.Complete+w.Truncated(), w.NoMapping
	}
	return append([]string{
		pprofout.MetaComment("bpf_walks", strconv.FormatUint(walks, 10)),
		pprofout.MetaComment("bpf_walks_truncated", strconv.FormatUint(tr, 10)),
		pprofout.MetaComment("bpf_walks_table_pending", strconv.FormatUint(pend, 10)),
		pprofout.MetaComment("bpf_stacks_lost", strconv.FormatUint(lost, 10)),
		pprofout.MetaComment("unwind_table_rows", strconv.FormatUint(st.Rows, 10)),
		pprofout.MetaComment("unwind_table_row_capacity", strconv.FormatUint(st.RowCapacity, 10)),
		pprofout.MetaComment("unwind_tables_evicted", strconv.FormatUint(st.Evicted, 10)),
		pprofout.MetaComment("unwind_tables_no_room", strconv.FormatUint(st.NoRoom+st.TooLarge, 10)),
		pprofout.MetaComment("bpf_walks_no_mapping", strconv.FormatUint(noMapping, 10)),
	}, rescanComments(st)...)
}

// rescanComments are the profile's figures of the rescans asked for by
// walks that met a pc in no known mapping (unwindtable.Stats): prompts =
// rescans + deferred (backed-off processes).
func rescanComments(st unwindtable.Stats) []string {
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	return []string{
		pprofout.MetaComment("unwind_rescan_prompts", u(st.RescanPrompts)),
		pprofout.MetaComment("unwind_rescans", u(st.Rescans)),
		pprofout.MetaComment("unwind_rescans_unchanged", u(st.RescansUnchanged)),
		pprofout.MetaComment("unwind_rescans_deferred", u(st.RescansDeferred)),
	}
}

// size is the number of interned stacks.
func (d *dwarfStacks) size() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.stacks)
}

// stats reports unwinding totals: stack copies unwound in userspace,
// stacks truncated (copies and, in cfi mode, BPF walks), and the
// allocation counts lost to the bucket bound.
func (d *dwarfStacks) stats() (unwound, truncated, bucketsFull uint64) {
	d.mu.Lock()
	unwound, truncated, bucketsFull = d.unwound, d.truncatedN, d.bucketsFull
	d.mu.Unlock()
	if d.store != nil {
		// cfi mode: the BPF walks' truncations too (unwound counts the
		// copies only: the walks are bpf_walks).
		if tr, _, lost, err := d.cfiStats(); err == nil {
			truncated += tr + lost
		}
	}
	return unwound, truncated, bucketsFull
}

// fpCache remembers, per object file, whether it was built with frame
// pointers (parsing its CFI to tell costs milliseconds for big objects).
type fpCache struct {
	mu sync.Mutex
	m  map[procmaps.FileID]bool
}

// objectFile is an object a process maps or will map: name is its path as
// the process names it (it decides whether it is a C runtime object), path
// is where memprof opens it: /proc/PID/map_files/* for a mapped object (the
// mapped file itself, whatever symlinks the target planted), or a host path
// for a command memprof starts.
type objectFile struct{ name, path string }

// hostObjects wraps host paths (a command's libraries) as objectFiles.
func hostObjects(paths []string) []objectFile {
	out := make([]objectFile, len(paths))
	for i, p := range paths {
		out[i] = objectFile{name: p, path: p}
	}
	return out
}

// hasFP reports whether the object at path (a host path or a /proc magic
// link) keeps frame pointers; unreadable or broken objects count as having
// them. The file is opened and parsed as hostile input (package targetfs).
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
	if f, err := targetfs.Open(path); err == nil {
		_ = targetfs.Guard(path, 0, func() error {
			ef, err := targetfs.NewELF(f)
			if err != nil {
				return err
			}
			fp := unwind.HasFramePointers(ef)
			c.mu.Lock()
			v = fp
			c.mu.Unlock()
			return nil
		})
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

// needsCFI reports whether a process mapping these objects needs CFI
// unwinding: its executable or any library of its own was built without
// frame pointers, so the frame-pointer walk would lose or invent frames in
// the middle of its stacks (mixed stacks included: an executable with frame
// pointers calling such a library, or the reverse).
func (c *fpCache) needsCFI(objects []objectFile) bool {
	for _, o := range objects {
		base := filepath.Base(o.name)
		runtime := false
		for _, r := range cRuntime {
			runtime = runtime || strings.HasPrefix(base, r)
		}
		if !runtime && !c.hasFP(o.path) {
			return true
		}
	}
	return false
}

// objectPaths lists the executable file mappings of pid, opened through
// /proc/PID/map_files.
func objectPaths(pid int) []objectFile {
	maps, err := procmaps.Read(pid)
	if err != nil {
		return nil
	}
	seen := map[procmaps.FileID]bool{}
	var out []objectFile
	for i := range maps {
		m := &maps[i]
		if m.Exec() && m.IsFile() && !seen[m.ID()] {
			seen[m.ID()] = true
			out = append(out, objectFile{name: m.Path, path: procmaps.MapFilesPath(pid, m)})
		}
	}
	return out
}

// hasFramePointers reports whether the executable of pid was built with
// frame pointers (read through /proc/PID/exe, so containers work).
func hasFramePointers(pid int) bool {
	var c fpCache
	return c.hasFP(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "exe"))
}
