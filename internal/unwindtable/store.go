package unwindtable

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/internal/unwind"
)

// Limits of bpf/unwind.h (UW_MAX_MAPPINGS, UW_MAX_TABLE_ROWS).
const (
	MaxMappings  = 512     // executable mappings per process; more are dropped and counted
	MaxTableRows = 1 << 23 // rows of one object's table (the BPF binary search's bound)
)

// reuseDelay is how long rows of an evicted table stay untouched before
// they are reused: far longer than any walk (tens of microseconds).
const reuseDelay = 10 * time.Millisecond

// Object states (enum uw_object_state).
const (
	objPending = 0
	objReady   = 1
	objNoCFI   = 2
)

// The BPF map values of bpf/unwind.h, field for field (TestLayoutMatchesBPF
// checks them against the bpf2go output).
type (
	bpfRow  struct{ PC, Rule uint32 }
	bpfRule struct {
		CFA, RA, BP, Pad uint8
		CFAOff, BPOff    int32
	}
	bpfObject  struct{ FirstRow, NRows, State, Pad uint32 }
	bpfMapping struct {
		Start, End, Bias uint64
		Object, Pad      uint32
	}
	bpfProc struct {
		N, Pad uint32
		Maps   [MaxMappings]bpfMapping
	}
)

// Maps are the maps of bpf/unwind.h (uw_procs, uw_objects, uw_rows,
// uw_rules) of a loaded collection that includes it. Tiers in separate
// collections share one set by loading with ebpf.CollectionOptions
// MapReplacements.
type Maps struct {
	Procs, Objects, Rows, Rules *ebpf.Map
	Stale                       *ebpf.Map // uw_stale; nil: Refresh does nothing
}

// Stats describe the tables held in BPF maps. Bytes is what they occupy of
// the preallocated capacity (8 bytes a row, 12 a rule); RowCapacity*8 is the
// memory bound of all tables.
type Stats struct {
	Objects, Ready, Pending, NoCFI int
	Rows, RowCapacity              uint64
	Rules                          int
	Bytes                          int64 // rows and rules
	Processes                      int   // processes with a mapping list
	ProcBytes                      int64 // their lists in uw_procs (16 KiB each)
	// Counters since the store was made.
	Built           uint64 // tables built and loaded
	Evicted         uint64 // tables evicted to make room
	NoRoom          uint64 // tables not loaded: the row array is full of tables in use
	TooLarge        uint64 // tables over the per-object row limit (frames there end the walk)
	BuildErrors     uint64 // objects whose ELF or CFI could not be read
	MappingsDropped uint64 // executable mappings beyond MaxMappings in a process
	EvictFailed     uint64 // evictions refused: the table's pending mark could not be written
	// Rescans asked for by walks that met a pc in no known mapping (marks in
	// uw_stale, the heap tier's stack copies): RescanPrompts = Rescans +
	// RescansDeferred. A rescan that finds the executable file mappings
	// unchanged (RescansUnchanged: the pc was garbage, or anonymous code)
	// backs the process off (RescanBackoffMax); prompts meanwhile are
	// deferred.
	RescanPrompts    uint64
	Rescans          uint64 // processes looked at again (maps read, or offered to the tiers)
	RescansUnchanged uint64 // rescans that found nothing new to build
	RescansDeferred  uint64 // prompts not acted on: the process was backed off, or over its allowance of rescans that find a change
}

// Store keeps the compact unwind tables of the objects mapped by the
// processes it is told about in the BPF maps of bpf/unwind.h. Objects are
// keyed by build ID, else (device, inode), and shared by all processes;
// tables are built in the background (a frame in an object whose table is
// not ready ends its walk with UW_TRUNC_PENDING) by at most Builders
// goroutines. When the row array is full, tables no process uses are
// evicted, least recently used first. Safe for concurrent use.
type Store struct {
	m            Maps
	capRows      uint32
	maxObjects   uint32
	maxRules     uint32
	maxTableRows int
	sem          chan struct{}
	wg           sync.WaitGroup

	mu      sync.Mutex
	objs    map[string]*object
	byID    map[uint32]*object
	freeIDs []uint32
	nextID  uint32
	rules   map[Rule]uint32
	free    []span // free row ranges, sorted by start, coalesced
	procs   map[uint32][]procMap
	keys    map[uint32]procKey // pid -> the mappings last set
	// backoffs are the processes whose rescans found nothing new
	// (targets.go).
	backoffs map[uint32]backoff
	churn    map[uint32]bucket // rescans that found a change, per process
	clock    uint64
	st       Stats
	// Tiers' process sets (targets.go): users counts the Targets holding
	// each process; the stale rescan loop runs while any is open.
	targets            map[*Targets]bool
	users              map[uint32]int
	loopStop, loopDone chan struct{}
	// staleKick brings the stale loop back to StaleInterval: a process
	// was set (a new target, an exec), whose libraries may be mapped
	// (ld.so) in the next milliseconds.
	staleKick chan struct{}
}

type span struct{ start, n uint32 }

// procKey is the ExecKey of the mappings last set for a process, and
// whether some of them were left out (a file that could not be opened or
// parsed: tried again at its rescans).
type procKey struct {
	key     string
	partial bool
}

type object struct {
	key         string
	id          uint32
	state       uint32
	base        uint64 // table base: mapping bias = load bias + base
	first, rows uint32
	refs        int // processes mapping it
	lastUse     uint64
	failed      bool // build failed: stays pending, counted
	retry       bool // refused for lack of room: built again when next mapped
}

type procMap struct {
	start, end, loadBias uint64
	obj                  *object
}

// NewStore manages the tables in m. maxTableRows bounds one object's
// table (<= 0 or above MaxTableRows: MaxTableRows); builders is the number
// of concurrent table builds (<= 0: 1).
func NewStore(m Maps, maxTableRows, builders int) *Store {
	if maxTableRows <= 0 || maxTableRows > MaxTableRows {
		maxTableRows = MaxTableRows
	}
	builders = max(builders, 1)
	s := &Store{
		m: m, capRows: m.Rows.MaxEntries(), maxObjects: m.Objects.MaxEntries(), maxRules: m.Rules.MaxEntries(),
		maxTableRows: maxTableRows, sem: make(chan struct{}, builders), staleKick: make(chan struct{}, 1),
		objs: map[string]*object{}, byID: map[uint32]*object{}, rules: map[Rule]uint32{}, procs: map[uint32][]procMap{},
		keys: map[uint32]procKey{}, backoffs: map[uint32]backoff{}, churn: map[uint32]bucket{},
	}
	s.free = []span{{0, s.capRows}}
	s.st.RowCapacity = uint64(s.capRows)
	return s
}

// SetProcess makes pid's executable file mappings (from procmaps.Read)
// those of maps: tables of objects not seen before are built in the
// background; the process's mapping list in uw_procs is replaced. Call it
// again after the process maps new code (dlopen). Mappings whose file
// cannot be opened or parsed are left out (the walk ends there, counted in
// BPF as UW_TRUNC_NO_MAPPING) and listed in the error.
func (s *Store) SetProcess(pid int, maps []procmaps.Mapping) error {
	var errs []error
	var list []procMap
	for i := range maps {
		m := &maps[i]
		if !m.Exec() || !m.IsFile() || m.End <= m.Start {
			continue
		}
		pm, err := s.mapping(pid, m)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		list = append(list, pm)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].start < list[j].start })
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(list) > MaxMappings {
		s.st.MappingsDropped += uint64(len(list) - MaxMappings)
		for _, pm := range list[MaxMappings:] {
			pm.obj.refs--
		}
		list = list[:MaxMappings]
	}
	s.release(s.procs[uint32(pid)])
	s.procs[uint32(pid)] = list
	key := ExecKey(maps)
	if s.keys[uint32(pid)].key != key {
		// New mappings (an exec, a dlopen a tier saw): its next mark is
		// rescanned at once.
		delete(s.backoffs, uint32(pid))
	}
	if err := s.writeProc(uint32(pid)); err != nil {
		errs = append(errs, err)
	}
	s.keys[uint32(pid)] = procKey{key: key, partial: len(errs) > 0}
	return errors.Join(errs...)
}

// RemoveProcess forgets pid (after it exits); its objects' tables stay
// cached until evicted.
func (s *Store) RemoveProcess(pid int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.release(s.procs[uint32(pid)])
	delete(s.procs, uint32(pid))
	delete(s.keys, uint32(pid))
	delete(s.backoffs, uint32(pid))
	delete(s.churn, uint32(pid))
	if err := s.m.Procs.Delete(uint32(pid)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unwindtable: delete mappings of process %d: %w", pid, err)
	}
	return nil
}

// Wait blocks until every table build started so far has finished.
func (s *Store) Wait() { s.wg.Wait() }

// WaitFor is Wait bounded by d: it reports whether every build finished.
func (s *Store) WaitFor(d time.Duration) bool {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// Prepare starts building the table of the object file at path (a host
// path) before any process maps it, such as the libraries a command
// stopped at its exec will load: SetProcess then finds it built (or
// building), keyed as a mapping of the same file would be. The table is
// evictable until a process maps the object. Errors: the file cannot be
// opened or is not ELF; a full table id space.
func (s *Store) Prepare(path string) error {
	f, err := targetfs.Open(path)
	if err != nil {
		return fmt.Errorf("unwindtable: %w", err)
	}
	ef, key, err := unwind.ParseObject(f, path)
	if err != nil {
		f.Close()
		return fmt.Errorf("unwindtable: parse ELF %s: %w", path, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if o := s.objs[key]; o != nil {
		f.Close()
		return nil
	}
	tid, err := s.newID()
	if err != nil {
		f.Close()
		return err
	}
	o := &object{key: key, id: tid}
	s.objs[key] = o
	s.byID[tid] = o
	if err := s.m.Objects.Put(tid, bpfObject{}); err != nil {
		f.Close()
		return fmt.Errorf("unwindtable: reset table id %d: %w", tid, err)
	}
	s.clock++
	o.lastUse = s.clock
	s.wg.Add(1)
	go s.build(o, f, ef)
	return nil
}

// Stats reports the tables held.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Objects = len(s.objs)
	for _, o := range s.objs {
		switch o.state {
		case objReady:
			st.Ready++
			st.Rows += uint64(o.rows)
		case objNoCFI:
			st.NoCFI++
		default:
			st.Pending++
		}
	}
	st.Rules = len(s.rules)
	st.Bytes = int64(st.Rows)*RowBytes + int64(st.Rules)*12
	st.Processes = len(s.procs)
	st.ProcBytes = int64(len(s.procs)) * int64(unsafe.Sizeof(bpfProc{}))
	return st
}

func (s *Store) release(list []procMap) {
	for _, pm := range list {
		pm.obj.refs--
	}
}

// mapping opens m's object, finds or creates its table, and returns the
// mapping with a reference to the object taken.
func (s *Store) mapping(pid int, m *procmaps.Mapping) (procMap, error) {
	f, err := procmaps.Open(pid, m)
	if err != nil {
		return procMap{}, fmt.Errorf("unwindtable: open mapping %x-%x of process %d: %w", m.Start, m.End, pid, err)
	}
	ef, key, err := unwind.ParseObject(f, m.Path)
	if err != nil {
		f.Close()
		return procMap{}, fmt.Errorf("unwindtable: parse ELF %s of process %d: %w", m.Path, pid, err)
	}
	bias, ok := unwind.LoadBias(ef, m)
	if !ok {
		f.Close()
		return procMap{}, fmt.Errorf("unwindtable: no PT_LOAD segment of %s covers file offset %#x", m.Path, m.Offset)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.objs[key]
	if o == nil {
		id, err := s.newID()
		if err != nil {
			f.Close()
			return procMap{}, err
		}
		o = &object{key: key, id: id}
		s.objs[key] = o
		s.byID[id] = o
		// The id may have served an evicted object: pending until built.
		if err := s.m.Objects.Put(id, bpfObject{}); err != nil {
			f.Close()
			return procMap{}, fmt.Errorf("unwindtable: reset table id %d: %w", id, err)
		}
		s.wg.Add(1)
		go s.build(o, f, ef)
	} else if o.retry {
		o.retry, o.failed = false, false
		s.wg.Add(1)
		go s.build(o, f, ef)
	} else {
		f.Close()
	}
	o.refs++
	s.clock++
	o.lastUse = s.clock
	return procMap{start: m.Start, end: m.End, loadBias: bias, obj: o}, nil
}

// newID returns a free table id, evicting an unused object if all are
// taken (caller holds s.mu).
func (s *Store) newID() (uint32, error) {
	if n := len(s.freeIDs); n > 0 {
		id := s.freeIDs[n-1]
		s.freeIDs = s.freeIDs[:n-1]
		return id, nil
	}
	if s.nextID < s.maxObjects {
		s.nextID++
		return s.nextID - 1, nil
	}
	if s.evictOne(nil) {
		return s.newID()
	}
	return 0, fmt.Errorf("unwindtable: all %d table ids are used by live processes", s.maxObjects)
}

// build parses and compiles the object's table, then loads it. It owns f.
func (s *Store) build(o *object, f *os.File, ef *elf.File) {
	defer s.wg.Done()
	defer f.Close()
	s.sem <- struct{}{}
	defer func() { <-s.sem }()
	var src *unwind.Table
	var t *Table
	var err error
	func() {
		// The object is the target's: a parser bug it triggers must cost
		// this table, not memprof.
		defer func() {
			if r := recover(); r != nil {
				src, err = nil, fmt.Errorf("unwindtable: panic building a table: %v", r)
			}
		}()
		src, _ = unwind.ParseTable(ef) // nil: no usable CFI, counted below
		if src != nil {
			t, err = Compile(src, s.maxTableRows)
		}
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.objs[o.key] != o {
		return // evicted while building
	}
	switch {
	case src == nil:
		o.failed = true
		s.st.BuildErrors++ // frames there end the walk as pending
		return
	case errors.Is(err, ErrTooLarge):
		o.failed = true
		s.st.TooLarge++
		return
	case err != nil:
		o.failed = true
		s.st.BuildErrors++
		return
	}
	if len(t.Rows) == 0 {
		o.state = objNoCFI
		if err := s.m.Objects.Put(o.id, bpfObject{State: objNoCFI}); err != nil {
			o.state, o.failed = objPending, true
			s.st.BuildErrors++
		}
		return
	}
	if err := s.load(o, t); err != nil {
		o.failed = true
		return
	}
	s.st.Built++
}

// load interns t's rules, places its rows in the row array and marks the
// object ready. Called with s.mu held, it releases it while the rows are
// written (a large table takes many batch updates), so recording is not
// held up.
func (s *Store) load(o *object, t *Table) error {
	rows := make([]bpfRow, len(t.Rows))
	var newRules []Rule
	for i, r := range t.Rows {
		id, ok := s.rules[r.Rule]
		if !ok {
			if uint32(len(s.rules)) >= s.maxRules {
				s.st.BuildErrors++
				return fmt.Errorf("unwindtable: rule array full (%d rules)", s.maxRules)
			}
			id = uint32(len(s.rules))
			s.rules[r.Rule] = id
			newRules = append(newRules, r.Rule)
		}
		rows[i] = bpfRow{PC: r.PC, Rule: id}
	}
	for _, r := range newRules {
		v := bpfRule{CFA: r.CFA, RA: r.RA, BP: r.BP, CFAOff: r.CFAOff, BPOff: r.BPOff}
		if err := s.m.Rules.Put(s.rules[r], v); err != nil {
			s.st.BuildErrors++
			return fmt.Errorf("unwindtable: write rule: %w", err)
		}
	}
	n := uint32(len(rows))
	first, ok := s.alloc(n)
	evicted := false
	for !ok && s.evictOne(o) {
		evicted = true
		first, ok = s.alloc(n)
	}
	if !ok {
		s.st.NoRoom++
		o.retry = true
		return fmt.Errorf("unwindtable: no room for %d rows", n)
	}

	s.mu.Unlock()
	if evicted {
		// A walk that read an evicted object's entry before it was marked
		// pending may still search its rows: let such walks (microseconds
		// long) finish before the rows are overwritten.
		time.Sleep(reuseDelay)
	}
	werr := s.writeRows(first, rows)
	s.mu.Lock()

	if werr != nil || s.objs[o.key] != o { // failed, or evicted meanwhile
		s.freeSpan(span{first, n})
		if werr != nil {
			s.st.BuildErrors++
		}
		return werr
	}
	if o.base = t.Base; o.base != 0 {
		// The mapping biases of processes using it include the base.
		var errs []error
		for pid, list := range s.procs {
			if slices.ContainsFunc(list, func(pm procMap) bool { return pm.obj == o }) {
				if err := s.writeProc(pid); err != nil {
					errs = append(errs, err)
				}
			}
		}
		// A process with a stale bias would unwind this object wrongly:
		// the table stays pending (its frames end the walk) instead.
		if err := errors.Join(errs...); err != nil {
			s.freeSpan(span{first, n})
			s.st.BuildErrors++
			return err
		}
	}
	// Rows and biases first, then the object entry: a walk sees the table
	// only once complete.
	if err := s.m.Objects.Put(o.id, bpfObject{FirstRow: first, NRows: n, State: objReady}); err != nil {
		s.freeSpan(span{first, n})
		s.st.BuildErrors++
		return fmt.Errorf("unwindtable: write table id %d: %w", o.id, err)
	}
	o.state, o.first, o.rows = objReady, first, n
	return nil
}

// writeRows writes rows at index first of the row array, in batches.
func (s *Store) writeRows(first uint32, rows []bpfRow) error {
	const chunk = 1 << 16
	keys := make([]uint32, 0, min(chunk, len(rows)))
	for i := 0; i < len(rows); i += chunk {
		end := min(i+chunk, len(rows))
		keys = keys[:0]
		for k := i; k < end; k++ {
			keys = append(keys, first+uint32(k))
		}
		if _, err := s.m.Rows.BatchUpdate(keys, rows[i:end], nil); err != nil {
			return fmt.Errorf("unwindtable: write %d rows: %w", len(rows), err)
		}
	}
	return nil
}

// alloc takes n rows from the first free range large enough.
func (s *Store) alloc(n uint32) (uint32, bool) {
	for i, sp := range s.free {
		if sp.n >= n {
			s.free[i] = span{sp.start + n, sp.n - n}
			if s.free[i].n == 0 {
				s.free = slices.Delete(s.free, i, i+1)
			}
			return sp.start, true
		}
	}
	return 0, false
}

// freeSpan returns a range to the free list, coalescing neighbours.
func (s *Store) freeSpan(f span) {
	i := sort.Search(len(s.free), func(i int) bool { return s.free[i].start > f.start })
	s.free = slices.Insert(s.free, i, f)
	if i+1 < len(s.free) && s.free[i].start+s.free[i].n == s.free[i+1].start {
		s.free[i].n += s.free[i+1].n
		s.free = slices.Delete(s.free, i+1, i+2)
	}
	if i > 0 && s.free[i-1].start+s.free[i-1].n == s.free[i].start {
		s.free[i-1].n += s.free[i].n
		s.free = slices.Delete(s.free, i, i+1)
	}
}

// evictOne drops the least recently used object no process maps, other
// than keep (caller holds s.mu); false if every object is in use.
func (s *Store) evictOne(keep *object) bool {
	var victim *object
	for _, o := range s.objs {
		if o != keep && o.refs <= 0 && (victim == nil || o.lastUse < victim.lastUse) {
			victim = o
		}
	}
	if victim == nil {
		return false
	}
	// Pending first, so no walk reads rows about to be reused; if that
	// fails the table must stay (the caller then finds no room).
	if err := s.m.Objects.Put(victim.id, bpfObject{}); err != nil {
		s.st.EvictFailed++
		return false
	}
	if victim.state == objReady {
		s.freeSpan(span{victim.first, victim.rows})
	}
	delete(s.objs, victim.key)
	delete(s.byID, victim.id)
	s.freeIDs = append(s.freeIDs, victim.id)
	s.st.Evicted++
	return true
}

// writeProc writes pid's mapping list to uw_procs (caller holds s.mu).
func (s *Store) writeProc(pid uint32) error {
	var v bpfProc
	list := s.procs[pid]
	v.N = uint32(len(list))
	for i, pm := range list {
		v.Maps[i] = bpfMapping{Start: pm.start, End: pm.end, Bias: pm.loadBias + pm.obj.base, Object: pm.obj.id}
	}
	if err := s.m.Procs.Put(pid, &v); err != nil {
		return fmt.Errorf("unwindtable: write mappings of process %d: %w", pid, err)
	}
	return nil
}

// TableInfo describes one object's table.
type TableInfo struct {
	Key   string // "b:<build ID>" or "i:<dev>:<inode>"
	State string // "ready", "no CFI" (frame pointers), "pending" (building, or refused: see Stats)
	Rows  uint32
	Bytes int64 // in the row array
	Procs int   // processes mapping it
}

// Tables lists the objects' tables, largest first.
func (s *Store) Tables() []TableInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]TableInfo, 0, len(s.objs))
	for _, o := range s.objs {
		ti := TableInfo{Key: o.key, State: "pending", Procs: o.refs}
		switch o.state {
		case objReady:
			ti.State, ti.Rows, ti.Bytes = "ready", o.rows, int64(o.rows)*RowBytes
		case objNoCFI:
			ti.State = "no CFI"
		}
		out = append(out, ti)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Rows != out[j].Rows {
			return out[i].Rows > out[j].Rows
		}
		return out[i].Key < out[j].Key
	})
	return out
}

// Refresh rescans the processes whose BPF walks met a pc outside every
// mapping the store gave them (code mapped later, such as by dlopen):
// read returns a process's current mappings (procmaps.Read). Processes the
// store does not know are skipped. It returns how many were updated.
func (s *Store) Refresh(read func(pid int) ([]procmaps.Mapping, error)) (int, error) {
	if s.m.Stale == nil {
		return 0, nil
	}
	var pids []uint32
	var pid uint32
	var v uint8
	it := s.m.Stale.Iterate()
	for it.Next(&pid, &v) {
		pids = append(pids, pid)
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("unwindtable: list stale processes: %w", err)
	}
	var errs []error
	n := 0
	for _, pid := range pids {
		// Before the rescan: a later miss marks it again.
		if err := s.m.Stale.Delete(pid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("unwindtable: clear stale mark of process %d: %w", pid, err))
		}
		s.mu.Lock()
		_, known := s.procs[pid]
		s.mu.Unlock()
		if !known {
			continue
		}
		maps, err := read(int(pid))
		if err != nil {
			errs = append(errs, fmt.Errorf("unwindtable: mappings of process %d: %w", pid, err))
			continue
		}
		if err := s.SetProcess(int(pid), maps); err != nil {
			errs = append(errs, err)
		}
		n++
	}
	return n, errors.Join(errs...)
}

// WalkStats counts BPF walks by how they ended (uw_stats, summed over CPUs).
type WalkStats struct {
	Complete    uint64 // reached the outermost frame
	MaxFrames   uint64 // UW_MAX_FRAMES frames
	NoMapping   uint64 // a pc in no known mapping
	Pending     uint64 // an object whose table was not loaded (building, refused)
	Unsupported uint64 // a rule the BPF walk does not evaluate (unknown expression, CFA in another register)
	ReadFailed  uint64 // stack memory unreadable
	BadFrame    uint64 // CFA not above rsp, unusable frame pointer, rbp unknown
	MapError    uint64 // inconsistent maps
	Busy        uint64 // no walk state free on the CPU: not walked
	Uretprobe   uint64 // a return address a uretprobe replaced, not resolved
}

// Truncated is the number of walks that did not complete (Busy included).
func (w WalkStats) Truncated() uint64 {
	return w.MaxFrames + w.NoMapping + w.Pending + w.Unsupported + w.ReadFailed + w.BadFrame + w.MapError + w.Busy + w.Uretprobe
}

// ReadWalkStats reads the uw_stats map of a loaded object.
func ReadWalkStats(m *ebpf.Map) (WalkStats, error) {
	var w WalkStats
	fields := []*uint64{&w.Complete, &w.MaxFrames, &w.NoMapping, &w.Pending, &w.Unsupported, &w.ReadFailed, &w.BadFrame, &w.MapError, &w.Busy, &w.Uretprobe}
	for i, f := range fields {
		var per []uint64
		if err := m.Lookup(uint32(i), &per); err != nil {
			return w, fmt.Errorf("unwindtable: read walk counter %d: %w", i, err)
		}
		for _, v := range per {
			*f += v
		}
	}
	return w, nil
}
