package unwindtable

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
)

// TestTargetsShared: two tiers' Targets on one Store (the agent's heap and
// RSS tiers). A process both hold stays in uw_procs until both removed it;
// a process marked stale by a walk is rescanned for the tier holding it
// (mapped, when its mappings changed: here the Store was given one fewer
// than it has, as before a dlopen) and offered to the others when the Store
// does not know it (adopt); the rescan loop stops with the last Targets.
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
	// The Store knows one executable mapping of t1 fewer than it has (a
	// library mapped since); a walk marks t1 (known, held by b) and t2
	// (unknown) stale.
	maps, err := procmaps.Read(t1.pid)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(maps) - 1; i >= 0; i-- {
		if maps[i].Exec() && maps[i].IsFile() {
			maps = slices.Delete(maps, i, i+1)
			break
		}
	}
	if err := b.Set(t1.pid, maps); err != nil {
		t.Fatal(err)
	}
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

// TestRescanBackoffSchedule: the rescans of a process whose walks mark it
// every 5 ms and whose rescans find nothing new follow the schedule of
// RescanBackoffMax: at 0, 5, 15, 35, 75, 155, 315, 635 and 1275 ms, then
// once a second, 17 in 10 s (against 2,000 without the backoff); a rescan
// of 100 µs keeps to the schedule, one of 100 ms pushes the next 5 s away
// (rescanDuty). Entries of processes never added are dropped once long
// over.
func TestRescanBackoffSchedule(t *testing.T) {
	s := &Store{procs: map[uint32][]procMap{}, backoffs: map[uint32]backoff{}}
	t0 := time.Unix(1e9, 0)
	var at []time.Duration
	for d := time.Duration(0); d < 10*time.Second; d += StaleInterval {
		now := t0.Add(d)
		if s.deferred(7, now) {
			continue
		}
		at = append(at, d)
		s.backOff(7, now, 100*time.Microsecond)
	}
	want := []time.Duration{0, 5, 15, 35, 75, 155, 315, 635, 1275, 2275, 3275, 4275, 5275, 6275, 7275, 8275, 9275}
	for i := range want {
		want[i] *= time.Millisecond
	}
	if !slices.Equal(at, want) {
		t.Errorf("rescans at %v, want %v", at, want)
	}
	// Unknown pids flagged once each: pruned when over 1024 + 2 x processes.
	for pid := uint32(100); pid < 1100; pid++ {
		s.backOff(pid, t0, 0)
	}
	later := t0.Add(2*RescanBackoffMax + time.Second)
	for pid := uint32(2000); pid < 2100; pid++ {
		s.backOff(pid, later, 0)
	}
	if n := len(s.backoffs); n > 1024 || n < 100 {
		t.Errorf("%d backoff entries after 1,100 pids flagged long ago and 100 now: want the old ones dropped, the recent kept", n)
	}
	if !s.deferred(2099, later) {
		t.Error("a process backed off just now is not deferred")
	}
	// A costly rescan (a huge listing): the next waits rescanDuty times
	// its cost, past the schedule's cap.
	s.backOff(9, t0, 100*time.Millisecond)
	if !s.deferred(9, t0.Add(rescanDuty*100*time.Millisecond-time.Millisecond)) || s.deferred(9, t0.Add(rescanDuty*100*time.Millisecond)) {
		t.Errorf("after a rescan of 100 ms: want the next deferred for %v", rescanDuty*100*time.Millisecond)
	}
}

// TestRescanBackoff: a live process marked stale every millisecond for
// 2 s whose mappings do not change (a corrupt stack's garbage return
// addresses) is rescanned at most 9 + 2 + 1 times (the backoff schedule's
// 9 in its first 1.275 s, one a second after, one for rounding) instead of
// every StaleInterval (~400), its tier is not told (nothing new), and the
// figures add up (prompts = rescans + deferred). A change of its mappings
// while backed off is found at the next due rescan (within
// RescanBackoffMax). A change a tier sets (the Store given one mapping
// fewer) ends the backoff: the next mark is rescanned at once (mapped is
// called).
func TestRescanBackoff(t *testing.T) {
	testprog.RequireRoot(t)
	p := buildPair(t, "omit-fp", omitFP, omitFP)
	tg := startTarget(t, p.exe, "chain")
	o := loadBPF(t, testRows)
	st := NewStore(testMaps(o), 0, 1)
	var mu sync.Mutex
	mapped := 0
	a := st.NewTargets(func(int) { mu.Lock(); mapped++; mu.Unlock() }, nil)
	defer a.Close()
	if err := a.Add(tg.pid, nil, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	one := uint8(1)
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		if err := o.UwStale.Put(uint32(tg.pid), one); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	// The last mark taken: the loop slows down to StaleIntervalMax while
	// only backed-off processes are marked, so a fixed wait races it.
	markTaken := func() {
		t.Helper()
		var v uint8
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if err := o.UwStale.Lookup(uint32(tg.pid), &v); errors.Is(err, ebpf.ErrKeyNotExist) {
				time.Sleep(50 * time.Millisecond) // its rescan or deferral done
				return
			}
		}
		t.Fatal("the last mark was not taken within 2 s")
	}
	markTaken()
	s := st.Stats()
	bound := uint64(9 + int(elapsed/RescanBackoffMax) + 1)
	t.Logf("%v of marks every ms: %d prompts, %d rescans (%d unchanged), %d deferred; bound %d", elapsed.Round(time.Millisecond),
		s.RescanPrompts, s.Rescans, s.RescansUnchanged, s.RescansDeferred, bound)
	if s.Rescans > bound || s.Rescans == 0 {
		t.Errorf("%d rescans of a process marked every ms for %v with unchanged mappings, want 1..%d", s.Rescans, elapsed, bound)
	}
	if s.RescanPrompts != s.Rescans+s.RescansDeferred || s.RescansUnchanged != s.Rescans {
		t.Errorf("stats %+v: want prompts = rescans + deferred, every rescan unchanged", s)
	}
	mu.Lock()
	if mapped != 0 {
		t.Errorf("mapped called %d times for rescans that found nothing new, want 0", mapped)
	}
	mu.Unlock()
	// A tier's own prompt (the heap tier's stack copies) goes through the
	// same backoff.
	st.mu.Lock()
	backedOff := st.deferred(uint32(tg.pid), time.Now())
	st.mu.Unlock()
	a.Prompted(tg.pid)
	time.Sleep(20 * time.Millisecond)
	if s2 := st.Stats(); backedOff && (s2.RescansDeferred != s.RescansDeferred+1 || s2.Rescans != s.Rescans) ||
		!backedOff && (s2.Rescans != s.Rescans+1 || s2.RescansUnchanged != s.RescansUnchanged+1) {
		t.Errorf("Prompted (backed off %v): %+v after %+v", backedOff, s2, s)
	}

	// A library mapped while backed off (the key the Store holds no longer
	// that of the process's mappings, as after a dlopen no tier saw): found
	// at the next due rescan, within RescanBackoffMax of the marks.
	st.mu.Lock()
	k := st.keys[uint32(tg.pid)]
	k.key += "dlopen;"
	st.keys[uint32(tg.pid)] = k
	st.mu.Unlock()
	told := func() bool { mu.Lock(); defer mu.Unlock(); return mapped > 0 }
	marked := time.Now()
	for time.Since(marked) < 5*time.Second && !told() {
		if err := o.UwStale.Put(uint32(tg.pid), one); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("a change while backed off: found %v after the marks began (cap %v)", time.Since(marked).Round(time.Millisecond), RescanBackoffMax)
	if !told() {
		t.Fatal("a change of mappings while backed off was not found within 5 s of marks")
	}
	markTaken()
	s = st.Stats()
	mu.Lock()
	mapped = 0
	mu.Unlock()

	// A change a tier sets (an exec, its own mapping check): the backoff
	// ends, the next mark is rescanned at once, and the tier told.
	maps, err := procmaps.Read(tg.pid)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(maps) - 1; i >= 0; i-- {
		if maps[i].Exec() && maps[i].IsFile() {
			maps = slices.Delete(maps, i, i+1)
			break
		}
	}
	if err := a.Set(tg.pid, maps); err != nil {
		t.Fatal(err)
	}
	marked = time.Now()
	if err := o.UwStale.Put(uint32(tg.pid), one); err != nil {
		t.Fatal(err)
	}
	for time.Since(marked) < 5*time.Second && !told() {
		time.Sleep(time.Millisecond)
	}
	t.Logf("after the change: rescanned and told %v after the mark", time.Since(marked).Round(time.Millisecond))
	if !told() {
		t.Error("the mark after a change of mappings was not rescanned within 5 s: still backed off")
	}
	if s2 := st.Stats(); s2.Rescans != s.Rescans+1 || s2.RescansUnchanged != s.RescansUnchanged {
		t.Errorf("after the change: %d rescans (%d unchanged), want %d (%d)", s2.Rescans, s2.RescansUnchanged, s.Rescans+1, s.RescansUnchanged)
	}
}

// TestRescanChurnBounded: a process whose every rescan finds a change (a
// dlopen and dlclose loop), prompted every 5 ms for 4 s, gets its burst of
// 20 rescans and then 10 a second: 20 + 40 (-2..+1 for rounding) instead of
// 800; after a second without one, a burst is available again.
func TestRescanChurnBounded(t *testing.T) {
	s := &Store{procs: map[uint32][]procMap{}, backoffs: map[uint32]backoff{}, churn: map[uint32]bucket{}}
	t0 := time.Unix(1e9, 0)
	n := 0
	var d time.Duration
	for ; d < 4*time.Second; d += StaleInterval {
		now := t0.Add(d)
		if s.deferred(7, now) {
			continue
		}
		n++
		s.changed(7, now)
	}
	if want := rescanBurst + 4*rescanRate; n < want-2 || n > want+1 {
		t.Errorf("%d rescans that found a change in 4 s, want %d..%d", n, want-2, want+1)
	}
	later := t0.Add(d + 2*time.Second)
	if s.deferred(7, later) || s.allowance(7, later).tokens != rescanBurst {
		t.Errorf("2 s after the last: deferred %v, %v tokens; want a full burst", s.deferred(7, later), s.allowance(7, later).tokens)
	}
}
