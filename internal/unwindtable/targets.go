package unwindtable

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/internal/procmaps"
)

// StaleInterval is how often the processes whose BPF walks met code
// outside their known mappings (uw_stale: a library mapped since, dlopen;
// a process a tier has not listed yet) are rescanned, each at most once per
// interval. Their walks end truncated meanwhile (counted). While none are
// rescanned (none marked, or only processes backed off: RescanBackoffMax)
// the wait doubles up to StaleIntervalMax: an idle node wakes 20 times a
// second instead of 200, and a new process of a target cgroup (adopted
// from its first walk) still gets its tables within ~50 ms plus their
// build.
const (
	StaleInterval    = 5 * time.Millisecond
	StaleIntervalMax = 50 * time.Millisecond
)

// Targets is one tier's set of processes in a Store. Tiers sharing a Store
// (the heap and RSS tiers of the agent) each hold their own Targets: a
// process both follow stays in uw_procs until both have removed it. The
// Store rescans the processes marked in uw_stale for all of them (one
// background loop while any Targets is open) and tells each Targets that
// holds the process (mapped), or offers an unknown process to each
// (adopt), so that a tier whose targets are whole cgroups gets the tables
// of a process that started since its last scan at its first walk.
type Targets struct {
	store  *Store
	mapped func(pid int)      // after a rescan prompted by a walk (may be nil)
	adopt  func(pid int) bool // a marked process the Store does not know: this tier's? (may be nil)

	mu     sync.Mutex
	given  map[int]string // pid -> ExecKey of the mappings last given
	closed bool
}

// NewTargets opens a tier's set of processes on s. mapped, if set, is
// called after the Store re-read the mappings of one of its processes
// because a walk met code it did not know (the tier's symbolizer takes them
// too, so a library unloaded later still resolves); adopt, if set, is asked
// whether an unknown process marked by a walk is one of the tier's targets,
// which is then added (without waiting for its tables).
func (s *Store) NewTargets(mapped func(pid int), adopt func(pid int) bool) *Targets {
	t := &Targets{store: s, mapped: mapped, adopt: adopt, given: map[int]string{}}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.targets == nil {
		s.targets = map[*Targets]bool{}
		s.users = map[uint32]int{}
	}
	s.targets[t] = true
	if s.loopStop == nil && s.m.Stale != nil {
		s.loopStop = make(chan struct{})
		s.loopDone = make(chan struct{})
		go s.staleLoop(s.loopStop, s.loopDone)
	}
	return t
}

// ExecKey identifies a process's executable file mappings (address ranges,
// offsets and files), to tell whether they changed.
func ExecKey(maps []procmaps.Mapping) string {
	var b strings.Builder
	for i := range maps {
		m := &maps[i]
		if m.Exec() && m.IsFile() {
			fmt.Fprintf(&b, "%x-%x:%x:%d:%d:%d;", m.Start, m.End, m.Offset, m.DevMajor, m.DevMinor, m.Inode)
		}
	}
	return b.String()
}

// Add gives pid's mappings (read now) to the Store. prepare are host paths
// of objects it is about to map (a command stopped at its exec: the
// libraries ld.so will map), whose tables are built now too. wait > 0
// bounds how long Add waits for the tables to be built, so the process's
// first walks find them. Adding a process again rescans it. Errors: its
// mappings cannot be read (gone), or some of its objects cannot be opened
// or parsed (walks end there, counted).
func (t *Targets) Add(pid int, prepare []string, wait time.Duration) error {
	for _, p := range prepare {
		_ = t.store.Prepare(p) // errors: SetProcess reports those of objects mapped
	}
	maps, err := procmaps.Read(pid)
	if err != nil {
		return err
	}
	err = t.Set(pid, maps)
	if wait > 0 {
		t.store.WaitFor(wait)
	}
	return err
}

// Set gives pid's mappings maps to the Store (adding pid if needed).
func (t *Targets) Set(pid int, maps []procmaps.Mapping) error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return errors.New("unwindtable: targets closed")
	}
	_, known := t.given[pid]
	t.given[pid] = ExecKey(maps)
	t.mu.Unlock()
	if !known {
		t.store.mu.Lock()
		t.store.users[uint32(pid)]++
		t.store.mu.Unlock()
	}
	err := t.store.SetProcess(pid, maps)
	select {
	case t.store.staleKick <- struct{}{}:
	default:
	}
	return err
}

// Rescan re-reads pid's mappings and gives them to the Store if its
// executable mappings changed since last given (a library mapped or
// unmapped), so a table is built before a walk needs it. A process not
// added is ignored.
func (t *Targets) Rescan(pid int) error {
	t.mu.Lock()
	old, known := t.given[pid]
	t.mu.Unlock()
	if !known {
		return nil
	}
	maps, err := procmaps.Read(pid)
	if err != nil {
		return err
	}
	if ExecKey(maps) == old {
		return nil
	}
	return t.Set(pid, maps)
}

// Has reports whether pid was added (and not removed).
func (t *Targets) Has(pid int) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.given[pid]
	return ok
}

// Remove forgets pid for this tier; the Store forgets it once no tier
// holds it. Errors: its uw_procs entry could not be deleted.
func (t *Targets) Remove(pid int) error {
	t.mu.Lock()
	_, known := t.given[pid]
	delete(t.given, pid)
	t.mu.Unlock()
	if !known {
		return nil
	}
	return t.store.unuse(pid)
}

// Close removes every process of the tier and stops the Store's rescans
// when no Targets is left open.
func (t *Targets) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	pids := make([]int, 0, len(t.given))
	for pid := range t.given {
		pids = append(pids, pid)
	}
	t.given = map[int]string{}
	t.mu.Unlock()
	for _, pid := range pids {
		_ = t.store.unuse(pid) // the process may be gone with its entry
	}
	s := t.store
	s.mu.Lock()
	delete(s.targets, t)
	var stop, done chan struct{}
	if len(s.targets) == 0 && s.loopStop != nil {
		stop, done = s.loopStop, s.loopDone
		s.loopStop, s.loopDone = nil, nil
	}
	s.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// unuse drops one tier's hold on pid; the last one removes it.
func (s *Store) unuse(pid int) error {
	s.mu.Lock()
	n := s.users[uint32(pid)] - 1
	if n > 0 {
		s.users[uint32(pid)] = n
		s.mu.Unlock()
		return nil
	}
	delete(s.users, uint32(pid))
	s.mu.Unlock()
	return s.RemoveProcess(pid)
}

// RescanBackoffMax caps how long a process whose rescans keep finding
// nothing new waits between rescans. A walk that meets a pc in no known
// mapping marks its process for a rescan; when the rescan finds the same
// executable file mappings (ExecKey) the pc was garbage (a corrupt stack)
// or code memprof does not unwind (anonymous JIT code), and the process's
// next rescan waits StaleInterval, then twice as long after each further
// rescan that finds nothing, up to RescanBackoffMax: a target whose walks
// keep meeting unknown code costs at most about 9 rescans in its first
// 1.3 s (5+10+...+640 ms) and one a second after that, instead of one every
// StaleInterval. A rescan that finds new mappings (a dlopen), and a
// process set again for any reason (an exec, a tier's own mapping check),
// end the backoff: its next mark is rescanned at the loop's next turn.
const RescanBackoffMax = time.Second

// rescanDuty bounds the time a process's rescans that find nothing new
// take: the next waits at least rescanDuty times as long as the last took
// (at most 2% of a core per process: a listing of tens of thousands of
// mappings takes tens of milliseconds to read and compare).
const rescanDuty = 50

// Rescans that find a change (a dlopen) are not backed off, but a process
// that changes its mappings without end (dlopen and dlclose in a loop) gets
// a burst of rescanBurst of them, then rescanRate a second (a token
// bucket): each costs an open and parse of every executable mapping and
// the tiers' symbol refresh. A program loading its plugins at start stays
// within the burst.
const (
	rescanBurst = 20
	rescanRate  = 10 // a second
)

// bucket is a process's allowance of rescans that find a change: tokens
// at last.
type bucket struct {
	tokens float64
	last   time.Time
}

// allowance is pid's bucket refilled to now (caller holds s.mu).
func (s *Store) allowance(pid uint32, now time.Time) bucket {
	b, ok := s.churn[pid]
	if !ok {
		return bucket{tokens: rescanBurst, last: now}
	}
	b.tokens = min(rescanBurst, b.tokens+now.Sub(b.last).Seconds()*rescanRate)
	b.last = now
	return b
}

// changed spends one of pid's rescans that find a change (caller holds
// s.mu).
func (s *Store) changed(pid uint32, now time.Time) {
	if s.churn == nil {
		s.churn = map[uint32]bucket{}
	}
	b := s.allowance(pid, now)
	b.tokens--
	s.churn[pid] = b
}

// backoff is a process's rescan backoff: marks before next are deferred;
// wait is the last wait (doubled by the next rescan that finds nothing).
type backoff struct {
	next time.Time
	wait time.Duration
}

// deferred reports whether pid's rescan is backed off at now (caller holds
// s.mu).
func (s *Store) deferred(pid uint32, now time.Time) bool {
	if b, ok := s.backoffs[pid]; ok && now.Before(b.next) {
		return true
	}
	_, churned := s.churn[pid]
	return churned && s.allowance(pid, now).tokens < 1
}

// backOff records a rescan of pid at now that found nothing new and took
// cost (caller holds s.mu).
func (s *Store) backOff(pid uint32, now time.Time, cost time.Duration) {
	if s.backoffs == nil {
		s.backoffs = map[uint32]backoff{}
	}
	b := s.backoffs[pid]
	b.wait = min(max(2*b.wait, StaleInterval), RescanBackoffMax)
	b.next = now.Add(max(b.wait, rescanDuty*cost))
	s.backoffs[pid] = b
	// Processes never added (unknown pids offered to the tiers) leave no
	// RemoveProcess: drop the entries whose wait is long over.
	if len(s.backoffs) > 2*len(s.procs)+1024 {
		for p, b := range s.backoffs {
			if now.Sub(b.next) > RescanBackoffMax {
				delete(s.backoffs, p)
			}
		}
	}
	if len(s.churn) > 2*len(s.procs)+1024 {
		for p := range s.churn {
			if s.allowance(p, now).tokens >= rescanBurst {
				delete(s.churn, p)
			}
		}
	}
}

// prompt counts a request to rescan pid (a mark, a stack copy) and
// reports whether it is deferred (the process is backed off).
func (s *Store) prompt(pid uint32, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.RescanPrompts++
	if s.deferred(pid, now) {
		s.st.RescansDeferred++
		return true
	}
	s.st.Rescans++
	return false
}

// staleLoop rescans the processes marked in uw_stale until stop is
// closed: every StaleInterval while some are rescanned, backing off to
// StaleIntervalMax while none are, back to StaleInterval when a process is
// set (staleKick). Each process's own rescans back off while they find
// nothing new (RescanBackoffMax).
func (s *Store) staleLoop(stop, done chan struct{}) {
	defer close(done)
	wait := StaleInterval
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-s.staleKick:
			wait = StaleInterval
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
			t.Reset(wait)
		case <-t.C:
			if s.rescanStale() > 0 {
				wait = StaleInterval
			} else {
				wait = min(2*wait, StaleIntervalMax)
			}
			t.Reset(wait)
		}
	}
}

// rescanStale rescans the marked processes that are not backed off: a
// known one gets its current mappings if they changed, and the Targets
// holding it are told (mapped); an unknown one is offered to each Targets
// (adopt). It returns how many were rescanned: marks of backed-off
// processes only (a corrupt stack's flood) let the loop slow down as when
// idle, so they cost it no more than 20 wakeups a second.
func (s *Store) rescanStale() int {
	var pids []uint32
	var pid uint32
	var v uint8
	it := s.m.Stale.Iterate()
	for it.Next(&pid, &v) {
		pids = append(pids, pid)
	}
	n := 0
	for _, pid := range pids {
		// Before the rescan: a later miss marks it again.
		if err := s.m.Stale.Delete(pid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		now := time.Now() // each rescan's cost its own (rescanDuty)
		if s.prompt(pid, now) {
			continue
		}
		n++
		s.mu.Lock()
		_, known := s.procs[pid]
		var others []*Targets
		for t := range s.targets {
			if !t.Has(int(pid)) {
				others = append(others, t)
			}
		}
		s.mu.Unlock()
		if known {
			s.rescan(pid, now)
			continue
		}
		adopted := false
		for _, t := range others {
			if t.adopt != nil && t.adopt(int(pid)) {
				adopted = true
				_ = t.Add(int(pid), nil, 0) // gone meanwhile: nothing to walk
				if t.mapped != nil {
					t.mapped(int(pid))
				}
			}
		}
		if !adopted {
			s.mu.Lock()
			s.backOff(pid, now, time.Since(now)) // no tier's: asked again only when due
			s.mu.Unlock()
		}
	}
	return n
}

// rescan re-reads the mappings of pid (known to the store, not backed
// off): unchanged executable file mappings back the process off; changed
// ones are set and the Targets holding it told (mapped).
func (s *Store) rescan(pid uint32, now time.Time) {
	maps, err := procmaps.Read(int(pid))
	if err != nil {
		return // gone meanwhile (or its listing over procmaps.MapsMaxBytes: its walks end there, counted)
	}
	key := ExecKey(maps)
	s.mu.Lock()
	prev, known := s.keys[pid]
	same := known && prev.key == key
	retry := prev.partial
	if same {
		s.st.RescansUnchanged++
		s.backOff(pid, now, time.Since(now))
		for _, pm := range s.procs[pid] {
			retry = retry || pm.obj.retry
		}
	}
	s.mu.Unlock()
	if same && !retry {
		return
	}
	// Changed, or unchanged with mappings left out last time (their files
	// may open now) or tables refused for lack of room (built again when
	// mapped).
	_ = s.SetProcess(int(pid), maps) // a mapping it cannot read ends its walks there, counted
	// Removed by every tier meanwhile (its unuse ran before SetProcess):
	// the entry just written must go.
	s.mu.Lock()
	if !same {
		s.changed(pid, now)
	}
	used := s.users[pid] > 0
	var holders []*Targets
	for t := range s.targets {
		if t.Has(int(pid)) {
			holders = append(holders, t)
		}
	}
	s.mu.Unlock()
	if !used {
		_ = s.RemoveProcess(int(pid))
		return
	}
	if same {
		return // nothing new for the tiers
	}
	for _, t := range holders {
		t.mu.Lock()
		if _, ok := t.given[int(pid)]; ok {
			t.given[int(pid)] = key
		}
		t.mu.Unlock()
		if t.mapped != nil {
			t.mapped(int(pid))
		}
	}
}

// Prompted asks for a rescan of pid as a walk's mark in uw_stale does (a
// tier saw a walk meet unknown code another way: the heap tier's stack
// copies): at once unless the process is backed off, and the Store is told
// only when its executable mappings changed. A process not added, or one
// of whose tables is being built, is ignored.
func (t *Targets) Prompted(pid int) {
	if !t.Has(pid) {
		return
	}
	s := t.store
	s.mu.Lock()
	building := false
	for _, pm := range s.procs[uint32(pid)] {
		building = building || (pm.obj.state == objPending && !pm.obj.failed && !pm.obj.retry)
	}
	s.mu.Unlock()
	if building {
		// A table of the process is being built: that explains the walk
		// (a pc in no mapping marks uw_stale too); a rescan would find
		// nothing and back the process off.
		return
	}
	now := time.Now()
	if s.prompt(uint32(pid), now) {
		return
	}
	s.rescan(uint32(pid), now)
}

// Shared is a Store with the maps that hold its tables (uw_procs,
// uw_objects, uw_rows, uw_rules, uw_stale, uw_scratch of the collection
// that made them), for another collection including unwind.h to load with
// as ebpf.CollectionOptions.MapReplacements (the map sizes must agree):
// its walks then use the same tables. Each tier keeps its own uw_stacks
// (a tier prunes the stacks its samples no longer refer to), uw_stats and
// uw_intern_stats.
type Shared struct {
	Store *Store
	Maps  map[string]*ebpf.Map
}
