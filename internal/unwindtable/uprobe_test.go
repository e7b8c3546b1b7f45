package unwindtable

import (
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// TestUprobeWalkLiveStack runs unw_lib.c's production build of the walk
// (bpf_probe_read_user of the live stack, registers from pt_regs) in a
// uprobe placed on the return address of leaf's call in unw_lib_mid, in a
// -fomit-frame-pointer build: when leaf returns, the walk must give exactly
// the frames internal/unwind found above leaf in a ptrace capture of the
// same thread a moment earlier, through main to _start.
func TestUprobeWalkLiveStack(t *testing.T) {
	testprog.RequireRoot(t)
	spec, err := bpf.LoadUnwindprobe()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps["uw_rows"].MaxEntries = testRows
	var o bpf.UnwindprobeObjects
	if err := spec.LoadAndAssign(&o, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load unwindprobe: %+v", ve)
		}
		t.Fatalf("load unwindprobe: %v", err)
	}
	defer o.Close()
	st := NewStore(Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules}, 0, 1)

	p := buildPair(t, "omit-fp", omitFP, omitFP)
	tg := startTarget(t, p.exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
	up, err := unwind.NewCache(64<<20).Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	want, tr := up.Unwind(regs, stack, maxFrames)
	lo, hi := funcRange(t, tg.maps, p.exe, "leaf")
	i := slices.IndexFunc(want[1:], func(pc uint64) bool { return pc-1 >= lo && pc-1 < hi }) + 1
	if tr || i < 1 || i+1 >= len(want) {
		t.Fatalf("userspace walk %x (truncated %v): no leaf frame", want, tr)
	}
	ret := want[i+1] // leaf's return address, in unw_lib_mid
	var off uint64
	for _, m := range tg.maps {
		if m.Path == p.lib && m.Start <= ret && ret < m.End {
			off = ret - m.Start + m.Offset
		}
	}
	if off == 0 {
		t.Fatalf("return address %#x is not in %s", ret, p.lib)
	}

	if err := st.SetProcess(tg.pid, tg.maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	ex, err := link.OpenExecutable(p.lib)
	if err != nil {
		t.Fatal(err)
	}
	l, err := ex.Uprobe("unw_lib_mid", o.UwProbe, &link.UprobeOptions{Address: off, PID: tg.pid})
	if err != nil {
		t.Fatalf("uprobe at %s+%#x: %v", p.lib, off, err)
	}
	defer l.Close()
	if _, err := tg.stdin.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	var out bpf.UnwindprobeUwProbeOut
	deadline := time.Now().Add(10 * time.Second)
	for out.Calls == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		if err := o.ProbeOut.Lookup(uint32(0), &out); err != nil {
			t.Fatal(err)
		}
	}
	if out.Calls != 1 {
		t.Fatalf("uprobe hit %d times, want 1", out.Calls)
	}
	got := out.Pcs[:min(out.N, uint32(len(out.Pcs)))]
	t.Logf("live walk: %d frames in %d ns, status %d", len(got), out.Ns, out.Status)
	if out.Status != uint32(bpf.UnwindtestUwStatusUW_COMPLETE) || !slices.Equal(got, want[i+1:]) {
		t.Errorf("live BPF walk %x status %d; want %x (the userspace walk above leaf), complete", got, out.Status, want[i+1:])
	}
	if pcs, complete, err := ReadStack(o.UwStacks, out.StackId); err != nil || !complete || !slices.Equal(pcs, got) {
		t.Errorf("interned stack %#x: %x complete %v (%v), want %x", out.StackId, pcs, complete, err, got)
	}
}

// TestUprobeWalkThroughUretprobe: a pending uretprobe (here on unw_lib_mid)
// replaces its function's return address on the stack by the kernel's
// trampoline; the live walk must recover the original from the thread's
// return instances and go on to main, where a walk of the raw stack stops.
func TestUprobeWalkThroughUretprobe(t *testing.T) {
	testprog.RequireRoot(t)
	spec, err := bpf.LoadUnwindprobe()
	if err != nil {
		t.Fatal(err)
	}
	spec.Maps["uw_rows"].MaxEntries = testRows
	var o bpf.UnwindprobeObjects
	if err := spec.LoadAndAssign(&o, nil); err != nil {
		t.Fatalf("load unwindprobe: %v", err)
	}
	defer o.Close()
	st := NewStore(Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules}, 0, 1)
	nop, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.Kprobe, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer nop.Close()

	p := buildPair(t, "uretprobe", omitFP, omitFP) // files of its own: the uretprobe covers every process
	lib, err := link.OpenExecutable(p.lib)
	if err != nil {
		t.Fatal(err)
	}
	ur, err := lib.Uretprobe("unw_lib_mid", nop, nil)
	if err != nil {
		t.Fatalf("uretprobe on unw_lib_mid: %v", err)
	}
	defer ur.Close()
	tg := startTarget(t, p.exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 32<<10)
	maps, err := procmaps.Read(tg.pid)
	if err != nil {
		t.Fatal(err)
	}
	var tramp uint64
	for _, m := range maps {
		if strings.HasSuffix(m.Path, "[uprobes]") { // procmaps keeps more than the name of special mappings
			tramp = m.Start
		}
	}
	if tramp == 0 {
		t.Fatalf("no [uprobes] mapping in the target")
	}
	up, err := unwind.NewCache(64<<20).Process(tg.pid, maps)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	raw, tr := up.Unwind(regs, stack, maxFrames)
	if !tr || raw[len(raw)-1] != tramp {
		t.Fatalf("walk of the raw stack: %x truncated %v; want it to stop at the trampoline %#x", raw, tr, tramp)
	}
	lo, hi := funcRange(t, maps, p.exe, "leaf")
	i := slices.IndexFunc(raw[1:], func(pc uint64) bool { return pc-1 >= lo && pc-1 < hi }) + 1
	if i < 1 || i+2 >= len(raw) {
		t.Fatalf("no leaf frame before the trampoline in %x", raw)
	}
	ret := raw[i+1]
	var off uint64
	for _, m := range maps {
		if m.Path == p.lib && m.Start <= ret && ret < m.End {
			off = ret - m.Start + m.Offset
		}
	}
	if err := st.SetProcess(tg.pid, maps); err != nil {
		t.Fatal(err)
	}
	st.Wait()
	l, err := lib.Uprobe("unw_lib_mid", o.UwProbe, &link.UprobeOptions{Address: off, PID: tg.pid})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := tg.stdin.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	var out bpf.UnwindprobeUwProbeOut
	for deadline := time.Now().Add(10 * time.Second); out.Calls == 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
		if err := o.ProbeOut.Lookup(uint32(0), &out); err != nil {
			t.Fatal(err)
		}
	}
	got := out.Pcs[:min(out.N, uint32(len(out.Pcs)))]
	t.Logf("live walk through a uretprobe: %d frames, status %d: %x", len(got), out.Status, got)
	if out.Calls != 1 || out.Status != uint32(bpf.UnwindtestUwStatusUW_COMPLETE) || len(got) < 3 {
		t.Fatalf("live walk %x status %d (%d probe hits); want complete", got, out.Status, out.Calls)
	}
	// The recovered return address is unw_lib_entry's call of unw_lib_mid;
	// with it in place of the trampoline, the userspace walk gives the same.
	elo, ehi := funcRange(t, maps, p.lib, "unw_lib_entry")
	if got[1]-1 < elo || got[1]-1 >= ehi {
		t.Errorf("frame after unw_lib_mid %#x is not in unw_lib_entry [%#x, %#x)", got[1], elo, ehi)
	}
	patched := slices.Clone(stack)
	n := 0
	for k := 0; k+8 <= len(patched); k += 8 {
		if binary.LittleEndian.Uint64(patched[k:]) == tramp {
			binary.LittleEndian.PutUint64(patched[k:], got[1])
			n++
		}
	}
	want, wtr := up.Unwind(regs, patched, maxFrames)
	if n != 1 || wtr || !slices.Equal(got, want[i+1:]) {
		t.Errorf("%d trampoline words patched; userspace walk %x truncated %v; want one, and %x == the BPF walk", n, want, wtr, want[i+1:])
	}
}
