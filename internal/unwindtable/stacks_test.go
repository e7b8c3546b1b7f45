package unwindtable

import (
	"reflect"
	"slices"
	"testing"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// TestIntern: uw_intern stores a walk's stack once under a stable key,
// distinct stacks under distinct keys, and a hash collision (forged here by
// occupying the stack's slots with another stack) moves it to its alternate
// slot, then is refused and counted, never merged.
func TestIntern(t *testing.T) {
	testprog.RequireRoot(t)
	if a, b := reflect.TypeOf(bpfStack{}), reflect.TypeOf(bpf.UnwindtestUwStack{}); a.Size() != b.Size() {
		t.Fatalf("bpfStack is %d bytes, uw_stack %d", a.Size(), b.Size())
	}
	if MaxFrames != len(bpf.UnwindtestUwStack{}.Pcs) {
		t.Fatalf("MaxFrames %d, BPF %d", MaxFrames, len(bpf.UnwindtestUwStack{}.Pcs))
	}
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 1)
	p := buildPair(t, "omit-fp", omitFP, omitFP)
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
	want, _ := up.Unwind(regs, stack, maxFrames)

	walk := func(n int) (uint64, []uint64) {
		newSnapshot(t, o, regs.SP, stack[:n])
		got, _ := bpfWalk(t, o, tg.pid, regs)
		var out bpf.UnwindtestUwTestOut
		if err := o.TestOut.Lookup(uint32(0), &out); err != nil {
			t.Fatal(err)
		}
		return out.StackId, got
	}
	id1, got := walk(len(stack))
	id2, _ := walk(len(stack))
	idShort, short := walk(256)
	if id1 == 0 || id1 != id2 || idShort == 0 || idShort == id1 {
		t.Fatalf("stack ids: full %#x then %#x, short %#x; want one nonzero id per distinct stack", id1, id2, idShort)
	}
	pcs, complete, err := ReadStack(o.UwStacks, id1)
	if err != nil || !complete || !slices.Equal(pcs, want) || !slices.Equal(got, want) {
		t.Errorf("stored stack %#x: %x complete %v (%v); want %x complete", id1, pcs, complete, err, want)
	}
	if pcs, complete, err := ReadStack(o.UwStacks, idShort); err != nil || complete || !slices.Equal(pcs, short) {
		t.Errorf("stored short stack: %x complete %v (%v); want %x truncated", pcs, complete, err, short)
	}

	// Forge a collision: another stack in the full stack's slot.
	other := bpf.UnwindtestUwStack{Check: 1, N: 1}
	other.Pcs[0] = 42
	if err := o.UwStacks.Delete(id1); err != nil {
		t.Fatal(err)
	}
	if err := o.UwStacks.Put(id1, other); err != nil {
		t.Fatal(err)
	}
	idAlt, _ := walk(len(stack))
	if idAlt != id1^(1<<63) {
		t.Errorf("with its slot taken: id %#x, want the alternate slot %#x", idAlt, id1^(1<<63))
	}
	if pcs, _, _ := ReadStack(o.UwStacks, idAlt); !slices.Equal(pcs, want) {
		t.Errorf("alternate slot holds %x, want %x", pcs, want)
	}
	if pcs, _, _ := ReadStack(o.UwStacks, id1); !slices.Equal(pcs, []uint64{42}) {
		t.Errorf("the other stack was overwritten: %x", pcs)
	}
	o.UwStacks.Delete(idAlt)
	o.UwStacks.Put(idAlt, other)
	if id, _ := walk(len(stack)); id != 0 {
		t.Errorf("both slots taken: id %#x, want 0 (not stored)", id)
	}
	s, err := ReadInternStats(o.UwInternStats)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("intern: %+v", s)
	if s != (InternStats{New: 3, Found: 1, Collisions: 1}) {
		t.Errorf("intern stats %+v, want 3 new, 1 found, 1 collision", s)
	}
}
