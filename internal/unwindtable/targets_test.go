package unwindtable

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/internal/testprog"
)

// TestTargetsShared: two tiers' Targets on one Store (the agent's heap and
// RSS tiers). A process both hold stays in uw_procs until both removed it;
// a process marked stale by a walk is rescanned for the tier holding it
// (mapped) and offered to the others when the Store does not know it
// (adopt); the rescan loop stops with the last Targets.
func TestTargetsShared(t *testing.T) {
	testprog.RequireRoot(t)
	p := buildPair(t, "omit-fp", omitFP, omitFP)
	t1 := startTarget(t, p.exe, "chain")
	t2 := startTarget(t, p.exe, "chain")
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 1)
	var mu sync.Mutex
	mappedA, mappedB, adopted := map[int]int{}, map[int]int{}, map[int]int{}
	a := st.NewTargets(func(pid int) { mu.Lock(); mappedA[pid]++; mu.Unlock() }, nil)
	b := st.NewTargets(func(pid int) { mu.Lock(); mappedB[pid]++; mu.Unlock() },
		func(pid int) bool { mu.Lock(); adopted[pid]++; mu.Unlock(); return pid == t2.pid })
	inProcs := func(pid int) bool {
		var v bpfProc
		err := o.UwProcs.Lookup(uint32(pid), &v)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		return err == nil
	}
	if err := a.Add(t1.pid, nil, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b.Add(t1.pid, nil, 0); err != nil {
		t.Fatal(err)
	}
	if s := st.Stats(); s.Processes != 1 || s.Ready+s.NoCFI != s.Objects {
		t.Fatalf("after both added pid %d: %+v, want one process, tables built", t1.pid, s)
	}
	if err := a.Remove(t1.pid); err != nil || !inProcs(t1.pid) {
		t.Fatalf("after one tier removed pid %d (err %v): in uw_procs %v, want kept for the other", t1.pid, err, inProcs(t1.pid))
	}
	if a.Has(t1.pid) || !b.Has(t1.pid) {
		t.Errorf("Has after tier a removed it: a %v b %v, want false true", a.Has(t1.pid), b.Has(t1.pid))
	}
	// A walk marks t1 (known, held by b) and t2 (unknown) stale.
	one := uint8(1)
	for _, pid := range []int{t1.pid, t2.pid} {
		if err := o.UwStale.Put(uint32(pid), one); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	rescanned := func() bool { mu.Lock(); defer mu.Unlock(); return mappedB[t1.pid] > 0 }
	for time.Now().Before(deadline) && (!b.Has(t2.pid) || !inProcs(t2.pid) || !rescanned()) {
		time.Sleep(5 * time.Millisecond)
	}
	mu.Lock()
	t.Logf("mapped by a %v, by b %v; adopt asked %v", mappedA, mappedB, adopted)
	if mappedB[t1.pid] != 1 || mappedA[t1.pid] != 0 {
		t.Errorf("rescan of pid %d: mapped called %d times for its holder, %d for the other tier; want 1, 0", t1.pid, mappedB[t1.pid], mappedA[t1.pid])
	}
	if adopted[t2.pid] == 0 || adopted[t1.pid] != 0 {
		t.Errorf("adopt asked %v: want pid %d (unknown) asked, pid %d (known) not", adopted, t2.pid, t1.pid)
	}
	mu.Unlock()
	if !b.Has(t2.pid) || !inProcs(t2.pid) || a.Has(t2.pid) {
		t.Errorf("pid %d after adoption: b holds %v, a %v, in uw_procs %v; want b only, listed", t2.pid, b.Has(t2.pid), a.Has(t2.pid), inProcs(t2.pid))
	}
	a.Close()
	b.Close()
	if inProcs(t1.pid) || inProcs(t2.pid) {
		t.Errorf("after both tiers closed: pids still in uw_procs")
	}
	st.mu.Lock()
	running := st.loopStop != nil
	st.mu.Unlock()
	if running {
		t.Error("rescan loop still running after the last Targets closed")
	}
}
