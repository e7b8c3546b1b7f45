package unwindtable

import (
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// TestLayoutMatchesBPF: the Go mirrors of the BPF map values and the rule
// kinds must be those bpf2go generates from bpf/unwind.h.
func TestLayoutMatchesBPF(t *testing.T) {
	for _, c := range []struct{ ours, gen any }{
		{bpfRow{}, bpf.UnwindtestUwRow{}},
		{bpfRule{}, bpf.UnwindtestUwRule{}},
		{bpfObject{}, bpf.UnwindtestUwObject{}},
		{bpfMapping{}, bpf.UnwindtestUwMapping{}},
		{bpfProc{}, bpf.UnwindtestUwProc{}},
	} {
		o, g := reflect.TypeOf(c.ours), reflect.TypeOf(c.gen)
		if o.Size() != g.Size() {
			t.Errorf("%v is %d bytes, %v %d", o, o.Size(), g, g.Size())
		}
		var of, gf []uintptr
		for i := range o.NumField() {
			of = append(of, o.Field(i).Offset)
		}
		for i := range g.NumField() {
			if g.Field(i).Name != "_" {
				gf = append(gf, g.Field(i).Offset)
			}
		}
		if !slices.Equal(of, gf) {
			t.Errorf("%v field offsets %v, %v has %v", o, of, g, gf)
		}
	}
	for _, c := range []struct {
		ours int
		gen  uint32
	}{
		{CFARSP, uint32(bpf.UnwindtestUwCfaKindUW_CFA_RSP)},
		{CFARBP, uint32(bpf.UnwindtestUwCfaKindUW_CFA_RBP)},
		{CFAPLT, uint32(bpf.UnwindtestUwCfaKindUW_CFA_PLT)},
		{CFAFP, uint32(bpf.UnwindtestUwCfaKindUW_CFA_FP)},
		{CFAStop, uint32(bpf.UnwindtestUwCfaKindUW_CFA_STOP)},
		{CFASignal, uint32(bpf.UnwindtestUwCfaKindUW_CFA_SIGNAL)},
		{RASaved, uint32(bpf.UnwindtestUwRaKindUW_RA_SAVED)},
		{RAEnd, uint32(bpf.UnwindtestUwRaKindUW_RA_END)},
		{BPSame, uint32(bpf.UnwindtestUwBpKindUW_BP_SAME)},
		{BPSaved, uint32(bpf.UnwindtestUwBpKindUW_BP_SAVED)},
		{BPUndef, uint32(bpf.UnwindtestUwBpKindUW_BP_UNDEF)},
		{objPending, uint32(bpf.UnwindtestUwObjectStateUW_OBJ_PENDING)},
		{objReady, uint32(bpf.UnwindtestUwObjectStateUW_OBJ_READY)},
		{objNoCFI, uint32(bpf.UnwindtestUwObjectStateUW_OBJ_NO_CFI)},
		{MaxMappings, uint32(len(bpf.UnwindtestUwProc{}.Maps))},
	} {
		if uint32(c.ours) != c.gen {
			t.Errorf("constant %d, BPF has %d", c.ours, c.gen)
		}
	}
	if n := reflect.TypeOf(WalkStats{}).NumField(); n != int(bpf.UnwindtestUwStatusUW_NR_STATUS) {
		t.Errorf("WalkStats has %d counters, BPF %d statuses", n, bpf.UnwindtestUwStatusUW_NR_STATUS)
	}
	if unsafe.Sizeof(bpfRow{}) != RowBytes {
		t.Errorf("row is %d bytes, RowBytes %d", unsafe.Sizeof(bpfRow{}), RowBytes)
	}
}

// TestVerifierCost loads the walk and reports how much verification it
// takes: the per-frame step is a global function, verified once, so the
// cost must stay far below the kernel's 1M-instruction limit.
func TestVerifierCost(t *testing.T) {
	testprog.RequireRoot(t)
	spec, err := bpf.LoadUnwindtest()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps["uw_rows"].MaxEntries = 1024
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	defer coll.Close()
	re := regexp.MustCompile(`processed (\d+) insns`)
	m := re.FindStringSubmatch(coll.Programs["uw_test"].VerifierLog)
	if m == nil {
		t.Fatalf("no instruction count in the verifier log: %q", coll.Programs["uw_test"].VerifierLog)
	}
	n, _ := strconv.Atoi(m[1])
	t.Logf("uw_test: verifier processed %d instructions", n)
	if n > 100_000 {
		t.Errorf("verifier processed %d instructions for one walk; want < 100k (limit 1M)", n)
	}
}

// TestBPFWalkEnds: a process the store does not know, and an object whose
// table is not loaded, end the walk with their own truncated status after
// the frames that could be recovered, and are counted in uw_stats.
func TestBPFWalkEnds(t *testing.T) {
	testprog.RequireRoot(t)
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 1)
	p := buildPair(t, "omit-fp", omitFP, omitFP)
	tg := startTarget(t, p.exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
	newSnapshot(t, o, regs.SP, stack)

	got, status := bpfWalk(t, o, tg.pid, regs)
	if status != bpf.UnwindtestUwStatusUW_TRUNC_NO_MAPPING || len(got) != 1 || got[0] != regs.IP {
		t.Errorf("unknown process: %x status %v, want the first pc only, no mapping", got, status)
	}
	up, err := unwind.NewCache(64<<20).Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	want, _ := up.Unwind(regs, stack, maxFrames)

	// Without the library's mappings (as before a dlopen), the walk stops at
	// its first frame; SetProcess with the current mappings completes it.
	var noLib []procmaps.Mapping
	for _, m := range tg.maps {
		if m.Path != p.lib {
			noLib = append(noLib, m)
		}
	}
	if err := st.SetProcess(tg.pid, noLib); err != nil {
		t.Fatalf("SetProcess: %v", err)
	}
	st.Wait()
	got, status = bpfWalk(t, o, tg.pid, regs)
	if status != bpf.UnwindtestUwStatusUW_TRUNC_NO_MAPPING || len(got) < 2 || !slices.Equal(got, want[:len(got)]) || pathOf(tg, got[len(got)-1]-1) != p.lib {
		t.Errorf("library not mapped: %x status %v; want a prefix of %x ending at the first library frame, no mapping", got, status, want)
	}
	// The walk marked the process stale: Refresh rescans it.
	if n, err := st.Refresh(func(int) ([]procmaps.Mapping, error) { return tg.maps, nil }); n != 1 || err != nil {
		t.Fatalf("Refresh = %d, %v; want the process rescanned", n, err)
	}
	st.Wait()
	if n, err := st.Refresh(func(int) ([]procmaps.Mapping, error) { return tg.maps, nil }); n != 0 || err != nil {
		t.Errorf("second Refresh = %d, %v; want nothing stale", n, err)
	}
	if s := st.Stats(); s.Objects != 4 || s.Built != 4 || s.Processes != 1 || s.ProcBytes != 8+MaxMappings*32 {
		t.Errorf("after the update: %+v, want 4 objects each built once, 1 process (8 + 512×32 bytes)", s)
	}

	// Mark the library's table pending, as while it is being built.
	st.mu.Lock()
	var libID uint32
	found := false
	for _, pm := range st.procs[uint32(tg.pid)] {
		if pathOf(tg, pm.start) == p.lib {
			libID, found = pm.obj.id, true
		}
	}
	st.mu.Unlock()
	if !found {
		t.Fatalf("library %s not in the store's mappings", p.lib)
	}
	var saved bpf.UnwindtestUwObject
	if err := o.UwObjects.Lookup(libID, &saved); err != nil {
		t.Fatal(err)
	}
	if err := o.UwObjects.Put(libID, bpf.UnwindtestUwObject{}); err != nil {
		t.Fatal(err)
	}
	got, status = bpfWalk(t, o, tg.pid, regs)
	if status != bpf.UnwindtestUwStatusUW_TRUNC_PENDING || len(got) < 2 || !slices.Equal(got, want[:len(got)]) || pathOf(tg, got[len(got)-1]-1) != p.lib {
		t.Errorf("pending library table: %x status %v; want a prefix of %x ending at the first library frame, pending", got, status, want)
	}
	o.UwObjects.Put(libID, saved)
	got, status = bpfWalk(t, o, tg.pid, regs)
	if status != bpf.UnwindtestUwStatusUW_COMPLETE || !slices.Equal(got, want) {
		t.Errorf("table restored: %x status %v, want %x complete", got, status, want)
	}
	// Every walk state of every CPU taken (walks preempted mid-way): no walk, counted.
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	busy := make([]bpf.UnwindtestUwState, ncpu)
	for i := range busy {
		busy[i].Busy = 1
	}
	for slot := range uint32(4) {
		if err := o.UwScratch.Put(slot, busy); err != nil {
			t.Fatalf("mark walk state %d busy: %v", slot, err)
		}
	}
	if got, status = bpfWalk(t, o, tg.pid, regs); status != bpf.UnwindtestUwStatusUW_BUSY || len(got) != 0 {
		t.Errorf("all walk states busy: %x status %v, want no frames, busy", got, status)
	}
	if err := o.UwScratch.Put(uint32(3), make([]bpf.UnwindtestUwState, ncpu)); err != nil {
		t.Fatal(err)
	}
	if got, status = bpfWalk(t, o, tg.pid, regs); status != bpf.UnwindtestUwStatusUW_COMPLETE || !slices.Equal(got, want) {
		t.Errorf("one walk state free: %x status %v, want %x complete", got, status, want)
	}

	ws, err := ReadWalkStats(o.UwStats)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("walks: %+v", ws)
	if ws != (WalkStats{Complete: 2, Pending: 1, NoMapping: 2, Busy: 1}) || ws.Truncated() != 4 {
		t.Errorf("walk stats %+v: want 2 complete, 1 pending, 2 without mapping, 1 busy", ws)
	}
}

// pathOf returns the path of the mapping holding addr.
func pathOf(tg *target, addr uint64) string {
	for _, m := range tg.maps {
		if m.Start <= addr && addr < m.End {
			return m.Path
		}
	}
	return ""
}

// TestStoreBounded: with a row array just large enough for one process's
// tables, a second process with other objects evicts the tables of the
// first (which has gone) and walks correctly; with an array too small for
// libc, libc's table is refused and counted, and walks end pending there.
func TestStoreBounded(t *testing.T) {
	testprog.RequireRoot(t)
	p1 := buildPair(t, "omit-fp", omitFP, omitFP)
	p2 := buildPair(t, "keep-fp", keepFP, keepFP)

	// Size of each process's tables, from an unbounded store.
	probe := NewStore(testMaps(loadBPF(t, testRows)), 0, 1)
	t1 := startTarget(t, p1.exe, "chain")
	if err := probe.SetProcess(t1.pid, t1.maps); err != nil {
		t.Fatal(err)
	}
	probe.Wait()
	need := probe.Stats().Rows
	// Room for process 1's tables plus a little: not for process 2's exe and lib too.
	o := loadBPF(t, uint32(need+16))
	st := NewStore(testMaps(o), 0, 1)
	if err := st.SetProcess(t1.pid, t1.maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	if s := st.Stats(); s.Ready != 4 || s.NoRoom != 0 {
		t.Fatalf("first process: %+v, want 4 tables ready", s)
	}
	st.RemoveProcess(t1.pid)

	t2 := startTarget(t, p2.exe, "chain")
	regs, stack := capture(t, t2.pid, t2.tid, 32<<10)
	if err := st.SetProcess(t2.pid, t2.maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	s := st.Stats()
	t.Logf("row capacity %d: %+v", need+16, s)
	if s.Evicted < 1 || s.NoRoom != 0 || s.Rows > s.RowCapacity {
		t.Errorf("second process: %+v; want evictions of the first process's tables, all loaded, within capacity", s)
	}
	up, err := unwind.NewCache(64<<20).Process(t2.pid, t2.maps)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	want, _ := up.Unwind(regs, stack, maxFrames)
	newSnapshot(t, o, regs.SP, stack)
	if got, status := bpfWalk(t, o, t2.pid, regs); status != bpf.UnwindtestUwStatusUW_COMPLETE || !slices.Equal(got, want) {
		t.Errorf("after eviction: %x status %v, want %x complete", got, status, want)
	}

	// Too small for libc: refused and counted; the walk stops pending in libc.
	small := loadBPF(t, 4096)
	ss := NewStore(testMaps(small), 0, 1)
	if err := ss.SetProcess(t2.pid, t2.maps); err != nil {
		t.Fatal(err)
	}
	ss.Wait()
	sst := ss.Stats()
	if sst.NoRoom < 1 || sst.Pending < 1 || sst.Rows > 4096 {
		t.Errorf("4096-row store: %+v; want libc refused (no room), pending, within capacity", sst)
	}
	newSnapshot(t, small, regs.SP, stack)
	got, status := bpfWalk(t, small, t2.pid, regs)
	if status != bpf.UnwindtestUwStatusUW_TRUNC_PENDING || len(got) != 1 {
		t.Errorf("4096-row store: %x status %v; want the libc pc (read's frame) then pending", got, status)
	}
	// A refused table is tried again when next mapped (and refused again here).
	if err := ss.SetProcess(t2.pid, t2.maps); err != nil {
		t.Fatal(err)
	}
	ss.Wait()
	if s2 := ss.Stats(); s2.NoRoom != sst.NoRoom+1 {
		t.Errorf("after mapping libc again: %d refusals, want %d (one more try)", s2.NoRoom, sst.NoRoom+1)
	}

	// Per-object bound.
	tiny := NewStore(testMaps(loadBPF(t, testRows)), 64, 1)
	if err := tiny.SetProcess(t2.pid, t2.maps); err != nil {
		t.Fatal(err)
	}
	tiny.Wait()
	if ts := tiny.Stats(); ts.TooLarge < 2 {
		t.Errorf("64-row object limit: %+v; want libc and ld.so over the limit", ts)
	}
}

// TestStorePrepare: tables built ahead by path (a command's libraries,
// before ld.so maps them) are the ones a later mapping of the same files
// uses: SetProcess finds them ready and builds nothing more, and the walk
// of the process completes.
func TestStorePrepare(t *testing.T) {
	testprog.RequireRoot(t)
	p := buildPair(t, "omit-fp", omitFP, omitFP)
	tg := startTarget(t, p.exe, "chain")
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 1)
	seen := map[procmaps.FileID]bool{}
	for i := range tg.maps {
		m := &tg.maps[i]
		if m.Exec() && m.IsFile() && !seen[m.ID()] {
			seen[m.ID()] = true
			if err := st.Prepare(procmaps.HostPath(tg.pid, m.Path)); err != nil {
				t.Fatalf("prepare %s: %v", m.Path, err)
			}
		}
	}
	if !st.WaitFor(30 * time.Second) {
		t.Fatal("tables not built within 30s")
	}
	before := st.Stats()
	if before.Objects != len(seen) || before.Processes != 0 {
		t.Fatalf("after preparing %d objects: %+v, want as many tables and no process", len(seen), before)
	}
	if err := st.Prepare("/nonexistent/lib.so"); err == nil {
		t.Error("preparing a missing file gave no error")
	}
	if err := st.SetProcess(tg.pid, tg.maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	after := st.Stats()
	t.Logf("prepared: %+v; after SetProcess: %+v", before, after)
	if after.Objects != before.Objects || after.Built != before.Built || after.Ready+after.NoCFI != after.Objects {
		t.Errorf("SetProcess after Prepare: %+v, want the %d prepared tables reused, none built again", after, before.Objects)
	}
	regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
	newSnapshot(t, o, regs.SP, stack)
	if got, status := bpfWalk(t, o, tg.pid, regs); status != bpf.UnwindtestUwStatusUW_COMPLETE {
		t.Errorf("walk with prepared tables: %x status %v, want complete", got, status)
	}
}
