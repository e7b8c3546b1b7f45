package unwindtable

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// testRows is the row capacity of the test objects (8 MiB).
const testRows = 1 << 20

// loadBPF loads bpf/unwindtest.bpf.c with a smaller row array.
func loadBPF(t testing.TB, rows uint32) *bpf.UnwindtestObjects {
	t.Helper()
	spec, err := bpf.LoadUnwindtest()
	if err != nil {
		t.Fatalf("load unwindtest spec: %v", err)
	}
	spec.Maps["uw_rows"].MaxEntries = rows
	var objs bpf.UnwindtestObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load unwindtest: %+v", ve)
		}
		t.Fatalf("load unwindtest: %v", err)
	}
	t.Cleanup(func() { objs.Close() })
	return &objs
}

func testMaps(o *bpf.UnwindtestObjects) Maps {
	return Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules, Stale: o.UwStale}
}

// snapshot holds a stack copy in memory of this process that the test
// programs read with bpf_probe_read_user (they run in this thread's context).
type snapshot struct{ mem []byte }

func newSnapshot(t testing.TB, o *bpf.UnwindtestObjects, sp uint64, stack []byte) *snapshot {
	t.Helper()
	size := (len(stack) + 4095) &^ 4095
	if size == 0 {
		size = 4096
	}
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		t.Fatalf("mmap snapshot: %v", err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	copy(mem, stack)
	s := &snapshot{mem: mem}
	if err := o.UwSnap.Put(uint32(0), bpf.UnwindtestUwSnapshot{Base: sp, Len: uint64(len(stack)), Uaddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}); err != nil {
		t.Fatalf("write snapshot: %v", err)
	}
	return s
}

// bpfWalk runs uw_test on regs and returns its frames and status.
func bpfWalk(t testing.TB, o *bpf.UnwindtestObjects, pid int, regs unwind.Regs) ([]uint64, bpf.UnwindtestUwStatus) {
	t.Helper()
	in := bpf.UnwindtestUwTestIn{Pid: uint32(pid), Ip: regs.IP, Sp: regs.SP, Bp: regs.BP}
	if err := o.TestIn.Put(uint32(0), in); err != nil {
		t.Fatalf("write test input: %v", err)
	}
	if _, err := o.UwTest.Run(&ebpf.RunOptions{}); err != nil {
		t.Fatalf("BPF_PROG_RUN uw_test: %v", err)
	}
	var out bpf.UnwindtestUwTestOut
	if err := o.TestOut.Lookup(uint32(0), &out); err != nil {
		t.Fatalf("read test output: %v", err)
	}
	if out.N > uint32(len(out.Pcs)) {
		t.Fatalf("uw_test returned %d frames", out.N)
	}
	return slices.Clone(out.Pcs[:out.N]), bpf.UnwindtestUwStatus(out.Status)
}

// funcRange returns the runtime [start, end) of function name in exe as
// mapped in maps.
func funcRange(t testing.TB, maps []procmaps.Mapping, exe, name string) (uint64, uint64) {
	t.Helper()
	f, err := elf.Open(exe)
	if err != nil {
		t.Fatalf("open %s: %v", exe, err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatalf("symbols of %s: %v", exe, err)
	}
	for _, m := range maps {
		if m.Path != exe || !m.Exec() {
			continue
		}
		bias, ok := unwind.LoadBias(f, &m)
		if !ok {
			continue
		}
		for _, s := range syms {
			if s.Name == name && elf.ST_TYPE(s.Info) == elf.STT_FUNC {
				return s.Value + bias, s.Value + s.Size + bias
			}
		}
	}
	t.Fatalf("no function %s mapped from %s", name, exe)
	return 0, 0
}

// TestBPFWalkMatchesUserspace runs unw_chain built without frame pointers
// (and in mixed builds), captures the stopped thread's registers and stack,
// loads the tables of every object it maps into the BPF maps, and runs the
// BPF walk over the captured stack: its frames must be exactly those of
// internal/unwind's userspace walk, complete, through main (or the thread
// start); a short stack copy must give a truncated prefix of them.
func TestBPFWalkMatchesUserspace(t *testing.T) {
	testprog.RequireRoot(t)
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 2)
	for _, tc := range []struct {
		name          string
		exe, lib      []string
		mode, outerFn string
	}{
		{"omit-fp", omitFP, omitFP, "chain", "main"},
		{"keep-fp", keepFP, keepFP, "chain", "main"},
		{"lib-dwarf", omitFP, dwarfFP, "chain", "main"},
		{"lib-no-cfi", omitFP, noCFI, "chain", "main"}, // library frames by the frame-pointer rule
		{"omit-fp", omitFP, omitFP, "thread", "thread_fn"},
		{"omit-fp", omitFP, omitFP, "qsort", "main"},  // through libc's own frames
		{"omit-fp", omitFP, omitFP, "signal", "main"}, // through a signal frame (libc's __restore_rt)
	} {
		t.Run(tc.name+"/"+tc.mode, func(t *testing.T) {
			p := buildPair(t, tc.name, tc.exe, tc.lib)
			tg := startTarget(t, p.exe, tc.mode)
			regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
			up, err := unwind.NewCache(64<<20).Process(tg.pid, tg.maps)
			if err != nil {
				t.Fatalf("userspace Process(%d): %v", tg.pid, err)
			}
			defer up.Close()
			want, wtrunc := up.Unwind(regs, stack, maxFrames)
			if wtrunc {
				t.Fatalf("userspace walk truncated: %x", want)
			}
			if err := st.SetProcess(tg.pid, tg.maps); err != nil {
				t.Fatalf("SetProcess(%d): %v", tg.pid, err)
			}
			defer st.RemoveProcess(tg.pid)
			st.Wait()
			newSnapshot(t, o, regs.SP, stack)
			got, status := bpfWalk(t, o, tg.pid, regs)
			t.Logf("BPF walk: %d frames, status %v; userspace: %d frames", len(got), status, len(want))
			if status != bpf.UnwindtestUwStatusUW_COMPLETE {
				t.Errorf("BPF walk status %v, want complete", status)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("BPF frames differ from userspace:\n BPF       %x\n userspace %x", got, want)
			}
			lo, hi := funcRange(t, tg.maps, p.exe, tc.outerFn)
			if !slices.ContainsFunc(got[1:], func(pc uint64) bool { return pc-1 >= lo && pc-1 < hi }) {
				t.Errorf("no frame in %s [%#x, %#x): %x", tc.outerFn, lo, hi, got)
			}
			if tc.name == "omit-fp" && tc.mode == "chain" {
				fp, _ := unwind.FramePointers(regs, stack, 127)
				if slices.ContainsFunc(fp[1:], func(pc uint64) bool { return pc-1 >= lo && pc-1 < hi }) {
					t.Errorf("the frame-pointer walk reaches main on a -fomit-frame-pointer build: the test proves nothing")
				}
				// A short copy: a truncated prefix, as in userspace.
				for _, n := range []int{64, 1024} {
					newSnapshot(t, o, regs.SP, stack[:n])
					short, status := bpfWalk(t, o, tg.pid, regs)
					ushort, utr := up.Unwind(regs, stack[:n], 127)
					if status != bpf.UnwindtestUwStatusUW_TRUNC_READ || !utr || !slices.Equal(short, ushort) {
						t.Errorf("%d-byte copy: BPF %x status %v, userspace %x truncated %v; want equal frames, truncated by a failed read",
							n, short, status, ushort, utr)
					}
				}
			}
		})
	}
	t.Run("cxx-thread", func(t *testing.T) {
		// A std::thread: through libstdc++'s thread trampoline and start_thread.
		exe := testprog.Build(t, "unw_cxx.cc", omitFP...)
		tg := startTarget(t, exe, "thread")
		regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
		up, err := unwind.NewCache(64<<20).Process(tg.pid, tg.maps)
		if err != nil {
			t.Fatal(err)
		}
		defer up.Close()
		want, wtrunc := up.Unwind(regs, stack, maxFrames)
		if err := st.SetProcess(tg.pid, tg.maps); err != nil {
			t.Fatal(err)
		}
		defer st.RemoveProcess(tg.pid)
		st.Wait()
		newSnapshot(t, o, regs.SP, stack)
		got, status := bpfWalk(t, o, tg.pid, regs)
		lo, hi := funcRange(t, tg.maps, exe, "cxx_level1")
		if wtrunc || status != bpf.UnwindtestUwStatusUW_COMPLETE || !slices.Equal(got, want) ||
			!slices.ContainsFunc(got[1:], func(pc uint64) bool { return pc-1 >= lo && pc-1 < hi }) {
			t.Errorf("C++ thread: BPF %x status %v; userspace %x truncated %v; want equal, complete, through cxx_level1", got, status, want, wtrunc)
		}
		t.Logf("C++ thread: %d frames, status %v", len(got), status)
	})
	s := st.Stats()
	t.Logf("store: %+v", s)
	var sum int64
	for _, ti := range st.Tables() {
		t.Logf("table %s: %s, %d rows, %d bytes, %d processes", ti.Key, ti.State, ti.Rows, ti.Bytes, ti.Procs)
		sum += ti.Bytes
	}
	if sum != int64(s.Rows)*RowBytes {
		t.Errorf("tables hold %d bytes, stats say %d rows", sum, s.Rows)
	}
	if s.Processes != 0 || s.ProcBytes != 0 {
		t.Errorf("every process was removed, stats say %d (%d bytes)", s.Processes, s.ProcBytes)
	}
	if s.Ready < 5 || s.NoCFI != 1 || s.Pending != 0 || s.BuildErrors != 0 {
		t.Errorf("store stats %+v: want >= 4 ready tables (exe, lib, libc, ld.so), 1 without CFI, none pending", s)
	}
}

// maxFrames is UW_MAX_FRAMES, the frame limit of both walks.
var maxFrames = len(bpf.UnwindtestUwTestOut{}.Pcs)

// TestBPFWalkCorruptedStacks is a differential test on hostile input: real
// captured stacks with random words overwritten, and random registers, must
// give exactly the frames and truncation of the userspace walk (the same
// rules; the BPF walk may only stop earlier, flagged, at a rule it does not
// evaluate), never more than UW_MAX_FRAMES, and never hang.
func TestBPFWalkCorruptedStacks(t *testing.T) {
	testprog.RequireRoot(t)
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 2)
	p := buildPair(t, "lib-no-cfi", omitFP, noCFI) // CFI and frame-pointer frames
	tg := startTarget(t, p.exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
	if err := st.SetProcess(tg.pid, tg.maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	up, err := unwind.NewCache(64<<20).Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	truth, _ := up.Unwind(regs, stack, maxFrames)
	rng := rand.New(rand.NewPCG(7, 11))
	same, early, frames, long := 0, 0, 0, 0
	for i := range 400 {
		bad := slices.Clone(stack[:min(len(stack), 4096)])
		for range 1 + rng.IntN(6) {
			off := rng.IntN(len(bad)/8) * 8
			v := rng.Uint64()
			switch rng.IntN(3) {
			case 0: // a pc of the true stack
				v = truth[rng.IntN(len(truth))]
			case 1: // an address in the copy
				v = regs.SP + uint64(rng.IntN(len(bad)))
			}
			binary.LittleEndian.PutUint64(bad[off:], v)
		}
		r := regs
		switch i % 4 {
		case 1:
			r.BP = regs.SP + uint64(rng.IntN(len(bad)))
		case 2:
			r.IP = truth[rng.IntN(len(truth))]
		case 3:
			r.BP = rng.Uint64()
		}
		want, wtr := up.Unwind(r, bad, maxFrames)
		newSnapshot(t, o, r.SP, bad)
		got, status := bpfWalk(t, o, tg.pid, r)
		gtr := status != bpf.UnwindtestUwStatusUW_COMPLETE
		frames += len(got)
		if len(got) >= 5 {
			long++
		}
		switch {
		case slices.Equal(got, want) && gtr == wtr:
			same++
		case status == bpf.UnwindtestUwStatusUW_TRUNC_UNSUPPORTED && len(got) <= len(want) && slices.Equal(got, want[:len(got)]):
			early++
		default:
			t.Fatalf("corrupted stack %d: BPF %x status %v, userspace %x truncated %v", i, got, status, want, wtr)
		}
	}
	t.Logf("400 corrupted stacks: %d identical walks, %d stopped earlier at a rule BPF does not evaluate; %d frames, %d walks of 5 frames or more",
		same, early, frames, long)
	if long < 100 {
		t.Errorf("only %d walks went 5 frames deep: the corruption does not exercise the walk", long)
	}
}
