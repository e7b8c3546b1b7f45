package rss

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/symbolize"
	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// DefaultSampleRate is the mean number of faulted bytes between samples.
const DefaultSampleRate = 512 * 1024

// ResidentBefore names the bucket of anonymous memory that was resident
// before the recording started (or before the process was first seen) and
// is still resident.
const ResidentBefore = "[resident before recording]"

// Options configure an RSS session.
type Options struct {
	SampleRate uint64   // mean faulted bytes between samples; 1 = every fault
	Pids       []int    // processes
	Cgroups    []string // cgroup directories (v1 memory or v2): every process in them and their descendants
	Command    []string // a command to start (its children are followed)
	Env        []string // its environment (nil: memprof's own)
	// FramePointers walks stacks by frame pointers alone (--stack-mode
	// fp); by default they are walked in BPF with the unwind tables built
	// from the objects' CFI (frame pointers where an object has none).
	FramePointers bool
	// Unwind, if set, are the heap tier's unwind tables (the agent: one
	// set of tables per node); otherwise the RSS tier builds its own for
	// its targets' objects.
	Unwind *unwindtable.Shared
	// Poll is how often every followed cgroup is re-listed (new processes
	// noted, new child cgroups registered) and exited processes reclaimed
	// (at most every 2 s); default 200ms. CgroupChanged rescans one cgroup
	// between polls. The agent, which follows every container of the node,
	// polls every few seconds: a process the poll has not noted yet is
	// still profiled (BPF filters by cgroup), only noted later.
	Poll time.Duration
	// Verify is how often every sampled folio is checked against pagemap
	// (default VerifyInterval); a profile checks the folios it reports
	// when it is built.
	Verify time.Duration
	Notify func(msg string)
	// OOM is called for each OOM kill of a target (or of any process with
	// AllOOMs) with the victim's RSS profile at the kill.
	OOM        func(*OOMKill)
	AllOOMs    bool
	AllowEmpty bool // start without targets (the agent adds cgroups later)
	// DropExited forgets exited processes entirely (the agent); otherwise
	// their faults stay in the profile.
	DropExited bool
}

// Kinds of targets in use (RSS_KIND_* in bpf/rss.h): BPF consults only
// the maps of the kinds set.
const (
	RSSKindPids    = 1
	RSSKindMemcgs  = 2
	RSSKindCgroups = 4
)

// Session is one RSS recording.
type Session struct {
	opts Options
	objs *objects
	rd   *ringbuf.Reader
	// targets are the RSS tier's processes in the unwind tables' store
	// (CFI mode; nil with frame pointers).
	targets *unwindtable.Targets
	sym     *symbolize.Cache
	start   time.Time
	cmd     *command
	done    chan struct{}
	wg      sync.WaitGroup

	mu    sync.Mutex
	procs map[int]*proc
	// cgDirs: target cgroup directories, each with the time it was first
	// followed (clock ticks after boot, as a process's start time)
	cgDirs    map[string]uint64
	cgVersion map[string]int    // cgroup version of each target directory
	cgIDs     map[uint64]string // registered cgroup ids (descendants included) -> their directory
	pending   map[string]bool   // cgroups to rescan at the loop's next turn (CgroupChanged)
	exited    map[int]time.Time // processes told exited lately (ProcessExited)
	// exitedFull: more exits told than exited holds: reclaim every process
	exitedFull bool
	wake       chan struct{}
	kinds      uint32
	errs       []string
	ooms       int
	reclaim    time.Time
	// verified: last check of every sampled folio against pagemap
	verified time.Time
	// lastStacks: how the stacks of the last profile were taken
	lastStacks StackStats
	// staleStacks: uw_stacks/rss_stacks ids found unreferenced at the
	// last prune (deleted if still so at the next)
	staleStacks map[uint64]bool
	pruned      time.Time // last pruneStacks
}

// VerifyInterval is how often, by default (Options.Verify), every sampled
// folio is checked against /proc/PID/pagemap and the ones given back are
// forgotten: it bounds the map for processes that churn through address
// space, and it is what an OOM post-mortem's residency is as of.
var VerifyInterval = 5 * time.Second

// verifyAll checks every sampled folio of live processes and forgets the
// ones given back.
func (s *Session) verifyAll() {
	s.verified = time.Now()
	for pid, entries := range s.pagesOf(func(uint32) bool { return true }) {
		s.mu.Lock()
		p := s.procs[int(pid)]
		frozen := p != nil && p.frozen != nil
		s.mu.Unlock()
		if !frozen && procmaps.Alive(int(pid)) {
			s.residencyOf(int(pid), entries)
		}
	}
}

// proc is what the session knows about one process.
type proc struct {
	pid       int
	comm      string
	cgroup    string // memory cgroup path (label)
	startAnon int64  // RssAnon when first seen
	sym       *symbolize.Process
	exited    bool
	// frozen: residency read in the exit stop of a command (nil: read live)
	frozen     []frozenPage
	frozenAnon int64
	frozenMaps []procmaps.Mapping
	// exitFaults: BPF fault buckets of an exited process, kept for the profile
}

// Start loads the RSS programs and starts following the targets.
func Start(ctx context.Context, opts Options) (*Session, error) {
	if len(opts.Pids) == 0 && len(opts.Cgroups) == 0 && len(opts.Command) == 0 && !opts.AllowEmpty {
		return nil, errors.New("nothing to record: give --pid, --cgroup, --pod or a command after --")
	}
	if opts.SampleRate == 0 {
		opts.SampleRate = DefaultSampleRate
	}
	if opts.Poll == 0 {
		opts.Poll = 200 * time.Millisecond
	}
	if opts.Verify == 0 {
		opts.Verify = VerifyInterval
	}
	if opts.Notify == nil {
		opts.Notify = func(string) {}
	}
	for _, pid := range opts.Pids {
		if !procmaps.Alive(pid) {
			return nil, fmt.Errorf("process %d not found: no such process on this host", pid)
		}
	}
	for _, cg := range opts.Cgroups {
		if st, err := os.Stat(cg); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("cgroup %s does not exist: give a directory under /sys/fs/cgroup", cg)
		}
	}
	objs, err := load(loadOptions{SampleRate: opts.SampleRate, FramePointers: opts.FramePointers, Unwind: opts.Unwind})
	if err != nil {
		return nil, err
	}
	rd, err := ringbuf.NewReader(objs.RssEvents)
	if err != nil {
		objs.close()
		return nil, fmt.Errorf("open RSS ring buffer: %w", err)
	}
	s := &Session{
		opts: opts, objs: objs, rd: rd,
		sym:   symbolize.NewCache(symbolize.Options{}),
		start: time.Now(), done: make(chan struct{}),
		procs: map[int]*proc{}, cgDirs: map[string]uint64{}, cgVersion: map[string]int{},
		cgIDs: map[uint64]string{}, pending: map[string]bool{}, exited: map[int]time.Time{},
		wake: make(chan struct{}, 1), staleStacks: map[uint64]bool{},
	}
	if objs.store != nil {
		// The store rescans a target whose walk met code mapped since
		// (dlopen) or that no scan has listed yet (a new process of a
		// target cgroup, a command's child).
		s.targets = objs.store.NewTargets(s.mappedSince, s.adopt)
	}
	s.wg.Add(1)
	go s.readEvents()
	for _, pid := range opts.Pids {
		if err := s.AddPid(pid); err != nil {
			s.Close()
			return nil, err
		}
	}
	for _, cg := range opts.Cgroups {
		if err := s.AddCgroup(cg); err != nil {
			s.Close()
			return nil, err
		}
	}
	if len(opts.Command) > 0 {
		env := opts.Env
		if env == nil {
			env = os.Environ()
		}
		cmd, err := startCommand(opts.Command, env, s.commandStarted, s.commandExiting)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.cmd = cmd
	}
	s.wg.Add(1)
	go s.loop(ctx)
	return s, nil
}

// OOMSupported reports whether OOM kills get an RSS post-mortem (the
// kernel's mark_victim passes the victim's task: Linux 6.8+).
func (s *Session) OOMSupported() bool { return s.objs.oom }

// StartTime is when the recording started.
func (s *Session) StartTime() time.Time { return s.start }

func (s *Session) setKinds(k uint32) {
	s.kinds |= k
	if err := s.objs.RssFilterKinds.Set(s.kinds); err != nil {
		s.recordErr(fmt.Errorf("set RSS filter kinds: %w", err))
	}
}

// targetsChanged invalidates the threads' cached target verdicts after a
// change of the target maps (caller holds mu).
func (s *Session) targetsChanged() {
	if err := s.objs.targetsChanged(); err != nil {
		s.recordErr(err)
	}
}

// AddPid makes pid a target (flags: mbpf.RssRssTargetFlag bits).
func (s *Session) AddPid(pid int) error { return s.addPid(pid, uint8(mbpf.RssRssTargetFlagRT_TARGET)) }

func (s *Session) addPid(pid int, flags uint8) error { return s.addPidLibs(pid, flags, nil) }

// addPidLibs is addPid with the host paths of objects pid will map.
func (s *Session) addPidLibs(pid int, flags uint8, libs []string) error {
	s.mu.Lock()
	s.setKinds(RSSKindPids)
	if err := s.objs.RssPids.Put(uint32(pid), flags); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("add process %d to the RSS targets: %w", pid, err)
	}
	s.targetsChanged()
	s.noteProc(pid)
	s.mu.Unlock()
	// Its tables built before it runs on (a command stopped at its exec)
	// or before the caller goes on, so its first faults' walks find them.
	s.addUnwind(pid, libs, tableWait)
	return nil
}

// tableWait bounds how long a target named by pid (or a command stopped at
// its exec) waits for its unwind tables; faults in code whose table is not
// ready by then get a truncated stack, counted.
const tableWait = 3 * time.Second

// addUnwind gives pid's mappings to the unwind tables' store (CFI mode)
// and builds the tables of libs (host paths of objects it will map),
// waiting up to wait for the tables.
func (s *Session) addUnwind(pid int, libs []string, wait time.Duration) {
	if s.targets == nil {
		return
	}
	if err := s.targets.Add(pid, libs, wait); err != nil && procmaps.Alive(pid) {
		// Objects it cannot read end its walks there (counted).
		s.mu.Lock()
		s.recordErr(fmt.Errorf("unwind tables of pid %d: %w", pid, err))
		s.mu.Unlock()
	}
}

// mappedSince runs after the store re-read pid's mappings for a walk that
// met code it did not know: the symbolizer takes them too, so a library
// unloaded later (dlclose) still resolves.
func (s *Session) mappedSince(pid int) {
	s.noteNew(pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.procs[pid]; p != nil && p.sym != nil && !p.exited && p.frozen == nil {
		s.refreshSym(p)
	}
}

// adopt tells whether pid, whose walk met no mappings (the store does not
// know it), is a target: named (or a child of a command), or in a target
// cgroup. Such a process started since the last scan; its first sampled
// faults are truncated until its tables are built.
func (s *Session) adopt(pid int) bool {
	var f uint8
	if s.objs.RssPids.Lookup(uint32(pid), &f) == nil && f&uint8(mbpf.RssRssTargetFlagRT_TARGET) != 0 {
		return true
	}
	v1, v2, err := cgroups.OfProcess(pid)
	if err != nil {
		return false
	}
	r1, r2 := cgroups.Root()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range []string{filepath.Join(r1, v1), filepath.Join(r2, v2)} {
		if id, err := cgroups.ID(d); err == nil {
			if _, ok := s.cgIDs[id]; ok {
				return true
			}
		}
	}
	return false
}

// AddCgroup makes every process of cgroup directory dir (v1 memory or v2)
// and of its descendants a target, including later ones.
func (s *Session) AddCgroup(dir string) error {
	dir = filepath.Clean(dir)
	s.mu.Lock()
	if _, ok := s.cgDirs[dir]; !ok {
		s.cgDirs[dir] = bootTicks()
	}
	s.mu.Unlock()
	err := s.scanCgroup(dir)
	if s.targets != nil {
		// The tables of the processes found now are built before the
		// caller goes on (as for a pid), so their first faults' walks
		// find them; processes that join later get theirs in the
		// background (faults meanwhile: truncated, counted).
		s.objs.store.WaitFor(tableWait)
	}
	return err
}

// CgroupChanged tells the session that processes joined or left cgroup
// directory dir (a target), or that a child cgroup was made under it: it
// is rescanned at the loop's next turn rather than at the next poll.
func (s *Session) CgroupChanged(dir string) {
	dir = filepath.Clean(dir)
	s.mu.Lock()
	if _, ok := s.cgDirs[dir]; ok {
		s.pending[dir] = true
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// ProcessExited tells the session that process pid exited (a process
// event, for any process of the host): if the session knows it, or notes
// it within exitedKeep (its last sampled faults are read after its exit),
// its state is reclaimed within reclaimEvery rather than at the next poll.
func (s *Session) ProcessExited(pid int) {
	s.mu.Lock()
	if len(s.exited) < maxExitedPending {
		s.exited[pid] = time.Now()
	} else {
		s.exitedFull = true // the next tick reclaims every process
	}
	s.mu.Unlock()
}

// ProcessExeced tells the session that process pid exec'd a new program
// (a process event): if the session knows it, its view of the process's
// mappings (symbols and unwind tables) is re-read execRefreshAfter later
// (once the dynamic loader has mapped the libraries), so its faults are
// walked, and an OOM post-mortem read after it died is symbolized, against
// the new program.
func (s *Session) ProcessExeced(pid int) {
	s.mu.Lock()
	known := s.procs[pid] != nil
	s.mu.Unlock()
	if !known {
		return
	}
	time.AfterFunc(execRefreshAfter, func() {
		select {
		case <-s.done:
			return
		default:
		}
		// The new program's unwind tables too, before its sampled
		// faults meet its mappings (else they end [truncated] until the
		// store's stale rescan adopts them).
		if s.targets != nil {
			_ = s.targets.Rescan(pid) // gone meanwhile: nothing to walk
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if p := s.procs[pid]; p != nil && p.sym != nil && !p.exited && p.frozen == nil {
			s.refreshSym(p)
		}
	})
}

const execRefreshAfter = 100 * time.Millisecond

// reclaimEvery is how often the processes told exited are reclaimed (in
// one pass over the folio map for all of them); exits told are kept
// exitedKeep, at most maxExitedPending of them (beyond: a full reclaim).
const (
	reclaimEvery     = 2 * time.Second
	exitedKeep       = 10 * time.Second
	maxExitedPending = 1 << 15
)

// bootTicks is the time now in clock ticks after boot (USER_HZ, the unit
// of a process's start time in /proc/PID/stat, which counts boot time).
func bootTicks() uint64 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return uint64(ts.Nano()) / (1e9 / userHZ)
}

// userHZ is the unit of /proc/PID/stat's times (100 on every Linux
// architecture's user ABI).
const userHZ = 100

// RemoveCgroup stops recording cgroup dir (the agent, when a container goes).
func (s *Session) RemoveCgroup(dir string) {
	dir = filepath.Clean(dir)
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.cgDirs, dir)
	delete(s.cgVersion, dir)
	delete(s.pending, dir)
	for id, d := range s.cgIDs {
		if d == dir || isUnder(d, dir) {
			if err := errors.Join(deleteKey(s.objs.RssMemcgs, id), deleteKey(s.objs.RssCgroups, id)); err != nil {
				s.recordErr(fmt.Errorf("remove cgroup %s: %w", d, err))
			}
			delete(s.cgIDs, id)
		}
	}
	s.targetsChanged()
}

// deleteKey deletes key from m on a cleanup path: a key already gone is
// not an error; any other failure leaves a stale entry the caller reports.
func deleteKey(m *ebpf.Map, key any) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from BPF map %s: %w", m, err)
	}
	return nil
}

// deleteKeys deletes keys from m as deleteKey, counting the failures; err
// is the first one.
func deleteKeys[K any](m *ebpf.Map, keys []K) (failed int, err error) {
	for _, k := range keys {
		if e := deleteKey(m, k); e != nil {
			if failed == 0 {
				err = e
			}
			failed++
		}
	}
	return failed, err
}

func isUnder(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && rel != ".." && !filepath.IsAbs(rel) && len(rel) > 0 && rel[0] != '.'
}

// scanCgroup registers dir and its descendants' ids with BPF and notes
// their processes. A leaf cgroup (the usual container) costs two stats and
// one read of cgroup.procs: its version is cached, and its descendants are
// listed only when its link count says it has some.
func (s *Session) scanCgroup(dir string) error {
	s.mu.Lock()
	v, since := s.cgVersion[dir], s.cgDirs[dir]
	s.mu.Unlock()
	if v == 0 {
		var err error
		if v, err = cgroups.Version(dir); err != nil {
			return fmt.Errorf("cgroup %s: %w", dir, err)
		}
		s.mu.Lock()
		if _, ok := s.cgDirs[dir]; ok {
			s.cgVersion[dir] = v
		}
		s.mu.Unlock()
	}
	dirs := cgroups.Subdirs(dir)
	ids := make([]uint64, len(dirs))
	for i, d := range dirs {
		ids[i], _ = cgroups.ID(d)
	}
	s.mu.Lock()
	for i, d := range dirs {
		id := ids[i]
		if id == 0 {
			continue
		}
		if _, ok := s.cgIDs[id]; ok {
			continue
		}
		// A v1 directory is the memory controller's (its id is the
		// task's memcg); a v2 directory is matched by the task's v2
		// cgroup id (on pure v2 hosts both are the same id).
		m, kind := s.objs.RssCgroups, uint32(RSSKindCgroups)
		if v == 1 {
			m, kind = s.objs.RssMemcgs, RSSKindMemcgs
		}
		if err := m.Put(id, uint8(1)); err != nil {
			s.mu.Unlock()
			return fmt.Errorf("add cgroup %s to the RSS targets: %w", d, err)
		}
		s.setKinds(kind)
		s.cgIDs[id] = d
		s.targetsChanged()
	}
	s.mu.Unlock()
	pids, err := cgroups.Procs(dir, true)
	if err != nil {
		return fmt.Errorf("list processes of cgroup %s: %w", dir, err)
	}
	s.mu.Lock()
	var fresh []int
	for _, pid := range pids {
		if s.procs[pid] == nil {
			fresh = append(fresh, pid)
		}
	}
	s.mu.Unlock()
	for _, pid := range fresh {
		// Read outside the lock; the fault reader may note it meanwhile
		// (noteNew): the first note is kept.
		p := s.scannedProc(pid, since)
		s.mu.Lock()
		if s.procs[pid] == nil {
			s.procs[pid] = p
		} else if p.sym != nil {
			p.sym.Close()
		}
		s.mu.Unlock()
		s.addUnwind(pid, nil, 0) // tables built in the background
	}
	return nil
}

// scannedProc is a process a cgroup scan found: since is when its cgroup
// was first followed (boot ticks). One that started after that had nothing
// resident before the recording (as a process first seen by its sampled
// fault, noteNew), however late the scan saw it; the others count their
// RssAnon now as resident before.
func (s *Session) scannedProc(pid int, since uint64) *proc {
	p := s.newProc(pid)
	if start, running := procmaps.StartTime(pid); running && since > 0 && start > since {
		return p
	}
	if pm, err := frag.ReadProcess(pid); err == nil {
		p.startAnon = int64(pm.RssAnon)
	} else {
		p.exited = !procmaps.Alive(pid)
	}
	return p
}

// noteProc records a process the first time it is seen: its name, cgroup,
// RssAnon now, and an open view of its files for symbolization (caller
// holds mu).
func (s *Session) noteProc(pid int) *proc {
	if p := s.procs[pid]; p != nil {
		return p
	}
	p := s.newProc(pid)
	if pm, err := frag.ReadProcess(pid); err == nil {
		p.startAnon = int64(pm.RssAnon)
	} else {
		p.exited = !procmaps.Alive(pid)
	}
	s.procs[pid] = p
	return p
}

// newProc is a process's name, memory cgroup and open view of its files.
func (s *Session) newProc(pid int) *proc {
	p := &proc{pid: pid, comm: procmaps.Comm(pid)}
	if v1, v2, err := cgroups.OfProcess(pid); err == nil {
		p.cgroup = v1
		if p.cgroup == "" {
			p.cgroup = v2
		}
	}
	if sp, err := s.sym.Snapshot(pid); err == nil {
		p.sym = sp
	}
	return p
}

// noteNew records a process whose first sampled fault arrives before a scan
// has seen it (it started during the recording: nothing of it was resident
// before), while it is alive: a process that faults in its memory and is
// OOM-killed between two scans still gets its symbols.
func (s *Session) noteNew(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.procs[pid] != nil {
		return
	}
	p := s.newProc(pid)
	p.exited = p.sym == nil && !procmaps.Alive(pid)
	s.procs[pid] = p
}

// refreshSym re-reads p's mappings for symbolization; failing for a process
// that has exited meanwhile is expected (its last view is kept), otherwise
// the error is reported (caller holds mu).
func (s *Session) refreshSym(p *proc) {
	if err := p.sym.Refresh(); err != nil && procmaps.Alive(p.pid) {
		s.recordErr(fmt.Errorf("refresh mappings of pid %d: %w", p.pid, err))
	}
}

// recordErr notes err once for the profile's comments (caller holds mu).
func (s *Session) recordErr(err error) {
	msg := err.Error()
	for _, e := range s.errs {
		if e == msg {
			return
		}
	}
	s.errs = append(s.errs, msg)
}

// readEvents consumes OOM kills.
func (s *Session) readEvents() {
	defer s.wg.Done()
	for {
		rec, err := s.rd.Read()
		if err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			continue
		}
		if len(rec.RawSample) < 4 {
			continue
		}
		if binary.LittleEndian.Uint32(rec.RawSample) == uint32(mbpf.RssRssEventTypeRE_OOM) {
			s.handleOOM(rec.RawSample)
		}
	}
}

// loop rescans cgroups (all at each poll, the changed ones when told) and
// reclaims the state of exited processes: all of them at a poll, the ones
// told exited every reclaimEvery.
func (s *Session) loop(ctx context.Context) {
	defer s.wg.Done()
	tick := time.NewTicker(min(s.opts.Poll, reclaimEvery))
	defer tick.Stop()
	lastPoll := time.Now()
	for {
		all, ticked := false, false
		select {
		case <-ctx.Done():
			return
		case <-s.done:
			return
		case <-tick.C:
			ticked = true
			if time.Since(lastPoll) >= s.opts.Poll-s.opts.Poll/10 {
				all, lastPoll = true, time.Now()
			}
		case <-s.wake:
		}
		s.mu.Lock()
		if ticked {
			s.targetsChanged() // a verdict on a reused css_set address lives one tick at most
		}
		var dirs []string
		if all {
			dirs = make([]string, 0, len(s.cgDirs))
			for d := range s.cgDirs {
				dirs = append(dirs, d)
			}
		} else {
			for d := range s.pending {
				dirs = append(dirs, d)
			}
		}
		clear(s.pending)
		s.mu.Unlock()
		for _, d := range dirs {
			if err := s.scanCgroup(d); err != nil && !os.IsNotExist(errors.Unwrap(err)) {
				s.mu.Lock()
				s.recordErr(err)
				s.mu.Unlock()
			}
		}
		switch {
		case all && time.Since(s.reclaim) > reclaimEvery:
			s.reclaimExited(nil)
		case ticked:
			s.mu.Lock()
			full := s.exitedFull
			s.exitedFull = false
			told := map[uint32]bool{}
			for pid, at := range s.exited {
				switch {
				case s.procs[pid] != nil && !s.procs[pid].exited:
					told[uint32(pid)] = true
				case time.Since(at) > exitedKeep:
					delete(s.exited, pid)
				}
			}
			s.mu.Unlock()
			if full {
				s.reclaimExited(nil)
			} else if len(told) > 0 {
				s.reclaimExited(told)
			}
		}
		if all && time.Since(s.verified) > s.opts.Verify {
			s.verifyAll()
		}
	}
}

// reclaimExited removes the sampled folios of processes that have exited
// (their memory is gone) from the BPF map, and forgets them entirely with
// DropExited. One pass over each map, one liveness check per process;
// only: the processes to look at (told exited; nil: every one).
func (s *Session) reclaimExited(only map[uint32]bool) {
	if only == nil {
		s.reclaim = time.Now()
	}
	var dead []mbpf.RssRssPageKey
	gone := map[uint32]bool{}
	isGone := func(tgid uint32) bool {
		if only != nil && !only[tgid] {
			return false
		}
		g, ok := gone[tgid]
		if !ok {
			g = !procmaps.Alive(int(tgid))
			gone[tgid] = g
		}
		return g
	}
	if only != nil {
		// Told exited: read the folio map only if one of them is gone
		// (an exit event comes just before the process is a zombie).
		anyGone := false
		for pid := range only {
			anyGone = isGone(pid) || anyGone
		}
		s.mu.Lock()
		for pid := range only {
			if gone[pid] || time.Since(s.exited[int(pid)]) > exitedKeep {
				delete(s.exited, int(pid)) // reclaimed now, or left to the poll
			}
		}
		s.mu.Unlock()
		if !anyGone {
			return
		}
	}
	err := bpfload.EachEntry(s.objs.RssPages, func(k mbpf.RssRssPageKey, _ mbpf.RssRssPage) {
		if isGone(k.Tgid) {
			dead = append(dead, k)
		}
	})
	failed, derr := deleteKeys(s.objs.RssPages, dead)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.recordErr(fmt.Errorf("list sampled folios: %w", err))
	}
	if derr != nil {
		s.recordErr(fmt.Errorf("forget %d of %d folios of exited processes: %w", failed, len(dead), derr))
	}
	drop := map[uint32]bool{}
	for pid, p := range s.procs {
		if !p.exited {
			if !isGone(uint32(pid)) {
				continue
			}
			delete(s.exited, pid)
			p.exited = true
			if err := deleteKey(s.objs.RssPids, uint32(pid)); err != nil {
				s.recordErr(fmt.Errorf("forget exited pid %d: %w", pid, err))
			}
			if s.targets != nil {
				_ = s.targets.Remove(pid) // gone: its entry may be too
			}
		}
		// Also one found exited when it was noted (gone between a
		// cgroup's listing and the read of its /proc files).
		if s.opts.DropExited {
			drop[uint32(pid)] = true
		}
	}
	s.dropProcs(drop)
	s.pruneStacks()
}

// pruneInterval is how often unreferenced stacks are looked for: each
// look reads every sampled folio and fault count.
var pruneInterval = 30 * time.Second

// pruneStacks deletes the stacks no sampled folio and no fault count
// refers to any more (processes dropped, folios given back), once found so
// at two prunes in a row (a sample that reuses a stack just after it was
// found unreferenced keeps it), so the stack map does not fill over a long
// recording (caller holds mu).
func (s *Session) pruneStacks() {
	if time.Since(s.pruned) < pruneInterval {
		return
	}
	s.pruned = time.Now()
	refs := map[uint64]bool{}
	var k mbpf.RssRssPageKey
	var v mbpf.RssRssPage
	it := s.objs.RssPages.Iterate()
	for it.Next(&k, &v) {
		refs[v.StackId] = true
	}
	var fk mbpf.RssRssFaultKey
	var n uint64
	fit := s.objs.RssFaults.Iterate()
	for fit.Next(&fk, &n) {
		refs[fk.StackId] = true
	}
	for _, p := range s.procs {
		for _, f := range p.frozen {
			refs[f.page.StackId] = true
		}
	}
	if it.Err() != nil || fit.Err() != nil {
		return // a partial view of the references: nothing is deleted
	}
	m := heap.Maps{Stacks: s.objs.RssStacks}
	if s.targets != nil {
		m.UwStacks = s.objs.UwStacks
	}
	heap.PruneStacks(m, refs, s.staleStacks)
}

// dropProcs forgets the fault counts and state of the processes in pids
// (caller holds mu): one pass over the fault map for all of them.
func (s *Session) dropProcs(pids map[uint32]bool) {
	if len(pids) == 0 {
		return
	}
	for pid := range pids {
		if p := s.procs[int(pid)]; p != nil && p.sym != nil {
			p.sym.Close()
		}
		delete(s.procs, int(pid))
	}
	var del []mbpf.RssRssFaultKey
	if err := bpfload.EachEntry(s.objs.RssFaults, func(fk mbpf.RssRssFaultKey, _ uint64) {
		if pids[fk.Tgid] {
			del = append(del, fk)
		}
	}); err != nil {
		s.recordErr(fmt.Errorf("list fault buckets: %w", err))
	}
	if failed, err := deleteKeys(s.objs.RssFaults, del); err != nil {
		s.recordErr(fmt.Errorf("forget %d of %d fault buckets of %d exited processes: %w", failed, len(del), len(pids), err))
	}
}

// AddCommand makes pid and its future children targets: a command another
// tier started (with memprof's environment), stopped at its exec.
func (s *Session) AddCommand(pid int) error {
	var libs []string
	if exe, err := os.Readlink(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "exe")); err == nil {
		libs = append([]string{exe}, targetfs.LoadedLibraries(exe, os.Environ())...)
	}
	return s.commandStarted(pid, libs)
}

// Freeze reads pid's residency now and keeps it for later profiles: a
// command another tier traces, stopped in its exit.
func (s *Session) Freeze(pid int) { s.freeze(pid) }

// commandStarted runs with the command stopped at its exec; libs are the
// objects it will map (host paths), whose unwind tables are built before
// it runs on.
func (s *Session) commandStarted(pid int, libs []string) error {
	err := s.addPidLibs(pid, uint8(mbpf.RssRssTargetFlagRT_TARGET|mbpf.RssRssTargetFlagRT_FOLLOW_FORKS), libs)
	if err == nil && s.targets != nil && len(libs) > 1 {
		go s.watchLoading(pid, libs)
	}
	return err
}

// watchLoading follows a command's start, once resumed, until ld.so has
// mapped its libraries (at most loadWatch): each change of its executable
// mappings is given to the store at once, so the walks of its first faults
// find the libraries' tables (built at the exec stop) rather than waiting
// for a walk to meet them and the rescan that follows.
func (s *Session) watchLoading(pid int, libs []string) {
	want := map[string]bool{}
	for _, l := range libs {
		want[filepath.Base(l)] = true
	}
	last := ""
	for end := time.Now().Add(loadWatch); time.Now().Before(end); time.Sleep(loadPoll) {
		select {
		case <-s.done:
			return
		default:
		}
		maps, err := procmaps.Read(pid)
		if err != nil {
			return // gone
		}
		if key := unwindtable.ExecKey(maps); key != last {
			last = key
			_ = s.targets.Set(pid, maps) // objects it cannot read end walks there, counted
		}
		seen := map[string]bool{}
		for i := range maps {
			if maps[i].Exec() && maps[i].IsFile() && want[filepath.Base(maps[i].Path)] {
				seen[filepath.Base(maps[i].Path)] = true
			}
		}
		if len(seen) == len(want) {
			return
		}
	}
}

// How long and how often a command's start is followed (watchLoading).
const (
	loadWatch = 500 * time.Millisecond
	loadPoll  = 500 * time.Microsecond
)

// commandExiting runs with the command stopped in its exit: its memory is
// still mapped, so its residency is read and kept.
func (s *Session) commandExiting(pid int) {
	s.freeze(pid)
}

// freeze reads pid's residency now and keeps it for later profiles.
func (s *Session) freeze(pid int) {
	pages := s.pagesOf(func(t uint32) bool { return t == uint32(pid) })
	res := s.residencyOf(pid, pages[uint32(pid)])
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.noteProc(pid)
	if p.sym != nil {
		s.refreshSym(p)
	}
	p.frozen = make([]frozenPage, 0, len(res))
	for i, e := range pages[uint32(pid)] {
		p.frozen = append(p.frozen, frozenPage{e, res[i]})
	}
	if pm, err := frag.ReadProcess(pid); err == nil {
		p.frozenAnon = int64(pm.RssAnon)
	}
	p.frozenMaps, _ = procmaps.Read(pid)
}

// frozenPage is a sampled folio of an exited command with its residency
// read in the exit stop.
type frozenPage struct {
	pageEntry
	resident float64
}

type pageEntry struct {
	key  mbpf.RssRssPageKey
	page mbpf.RssRssPage
}

// pagesOf reads the sampled folios of the processes keep selects.
func (s *Session) pagesOf(keep func(uint32) bool) map[uint32][]pageEntry {
	out := map[uint32][]pageEntry{}
	if err := bpfload.EachEntry(s.objs.RssPages, func(k mbpf.RssRssPageKey, v mbpf.RssRssPage) {
		if keep(k.Tgid) {
			out[k.Tgid] = append(out[k.Tgid], pageEntry{k, v})
		}
	}); err != nil {
		s.mu.Lock()
		s.recordErr(fmt.Errorf("list sampled folios: %w", err))
		s.mu.Unlock()
	}
	return out
}

// residencyOf checks pid's sampled folios against pagemap and forgets the
// ones entirely gone; it returns the resident fraction of each (all 0 when
// the process has exited).
func (s *Session) residencyOf(pid int, pages []pageEntry) []float64 {
	out := make([]float64, len(pages))
	folios := make([]folio, len(pages))
	for i, e := range pages {
		folios[i] = folio{addr: e.key.Addr, size: e.page.Size, fault: e.page.Fault}
	}
	res, err := checkResidency(pid, folios)
	if err != nil {
		return out
	}
	var gone []mbpf.RssRssPageKey
	for i, r := range res {
		out[i] = r.fraction()
		if r.gone() {
			gone = append(gone, pages[i].key)
		}
	}
	if failed, err := deleteKeys(s.objs.RssPages, gone); err != nil {
		s.mu.Lock()
		s.recordErr(fmt.Errorf("forget %d of %d folios given back by pid %d: %w", failed, len(gone), pid, err))
		s.mu.Unlock()
	}
	return out
}

// newStackTable is an empty table of the stacks of one profile.
func (s *Session) newStackTable() *stackTable {
	if s.targets != nil {
		return newStackTable(s.objs.UwStacks, nil)
	}
	return newStackTable(nil, s.objs.RssStacks)
}

// UnwindTables are the tier's unwind tables (CFI mode; nil otherwise) for
// the heap tier of the same recording to walk with (record --rss --heap).
func (s *Session) UnwindTables() *unwindtable.Shared {
	if s.objs.store == nil {
		return nil
	}
	o := s.objs
	return &unwindtable.Shared{Store: o.store, Maps: map[string]*ebpf.Map{
		"uw_procs": o.UwProcs, "uw_objects": o.UwObjects, "uw_rows": o.UwRows, "uw_rules": o.UwRules,
		"uw_stale": o.UwStale, "uw_scratch": o.UwScratch,
	}}
}

// StackStats tells how the stacks of the last profile built were taken.
func (s *Session) StackStats() StackStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastStacks
}

// Counters returns the BPF side's counters.
func (s *Session) Counters() (Counters, error) { return s.objs.counters() }

// Pids lists the processes seen so far.
func (s *Session) Pids() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for pid := range s.procs {
		out = append(out, pid)
	}
	sort.Ints(out)
	return out
}

// Wait blocks until d passes (0: no limit), ctx is cancelled, or the
// command exits (without a command: until ctx or d).
func (s *Session) Wait(ctx context.Context, d time.Duration) string {
	var timeout <-chan time.Time
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timeout = t.C
	}
	var cmdDone <-chan cmdExit
	if s.cmd != nil {
		cmdDone = s.cmd.status
	}
	// Targets named only by pid: the recording ends when they have all
	// exited (cgroups stay followed: new processes may join them).
	var poll <-chan time.Time
	if s.cmd == nil && len(s.opts.Cgroups) == 0 && len(s.opts.Pids) > 0 {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		poll = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return "interrupted"
		case <-timeout:
			return "duration reached"
		case st := <-cmdDone:
			if st.signal != 0 {
				return fmt.Sprintf("command killed by signal %d (%s)", int(st.signal), st.signal)
			}
			return fmt.Sprintf("command exited with status %d", st.code)
		case <-poll:
			if !slices.ContainsFunc(s.opts.Pids, procmaps.Alive) {
				return "all targets exited"
			}
		}
	}
}

// CommandPid is the pid of the command memprof started (0: none).
func (s *Session) CommandPid() int {
	if s.cmd == nil {
		return 0
	}
	return s.cmd.pid
}

// Close detaches the programs and frees everything.
func (s *Session) Close() {
	select {
	case <-s.done:
		return
	default:
		close(s.done)
	}
	s.rd.Close()
	s.wg.Wait()
	if s.targets != nil {
		s.targets.Close()
	}
	s.objs.close()
	s.mu.Lock()
	for _, p := range s.procs {
		if p.sym != nil {
			p.sym.Close()
		}
	}
	s.mu.Unlock()
}

// statsComments are the session's counters as profile comments.
func (s *Session) statsComments() []string {
	var out []string
	if c, err := s.objs.counters(); err == nil {
		out = append(out,
			pprofout.MetaComment("rss_folios", strconv.FormatUint(c.Folios, 10)),
			pprofout.MetaComment("rss_faulted_bytes", strconv.FormatUint(c.Bytes, 10)),
			pprofout.MetaComment("rss_samples", strconv.FormatUint(c.Samples, 10)))
		lost := c.Lost()
		keys := make([]string, 0, len(lost))
		for k := range lost {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			out = append(out, pprofout.MetaComment("lost_"+k, strconv.FormatUint(lost[k], 10)))
		}
	}
	out = append(out, pprofout.MetaComment("sample_rate", strconv.FormatUint(s.opts.SampleRate, 10)))
	n := s.objs.RssPages.MaxEntries()
	out = append(out, pprofout.MetaComment("rss_page_map_capacity", strconv.FormatUint(uint64(n), 10)))
	return out
}

// stackComments are the profile's stack figures: its sampled faults whose
// stack walk was truncated (by cause) or not stored, and the BPF walks'
// outcomes and the unwind tables held (CFI mode).
func (s *Session) stackComments(ss StackStats) []string {
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	out := []string{
		pprofout.MetaComment("rss_stack_mode", map[bool]string{true: "cfi", false: "fp"}[s.targets != nil]),
		pprofout.MetaComment("rss_samples_stack_truncated", u(ss.Truncated)),
		pprofout.MetaComment("rss_samples_stack_table_pending", u(ss.Pending)),
		pprofout.MetaComment("rss_samples_stack_not_mapped_yet", u(ss.NoMapping)),
		pprofout.MetaComment("rss_samples_stack_unavailable", u(ss.Unknown)),
	}
	if s.targets == nil {
		return out
	}
	if w, err := unwindtable.ReadWalkStats(s.objs.UwStats); err == nil {
		out = append(out, pprofout.MetaComment("rss_bpf_walks", u(w.Complete+w.Truncated())),
			pprofout.MetaComment("rss_bpf_walks_truncated", u(w.Truncated())),
			pprofout.MetaComment("rss_bpf_walks_no_mapping", u(w.NoMapping)))
	}
	if in, err := unwindtable.ReadInternStats(s.objs.UwInternStats); err == nil {
		out = append(out, pprofout.MetaComment("rss_stack_hash_collisions", u(in.Collisions)),
			pprofout.MetaComment("rss_stack_map_full", u(in.Full)))
	}
	st := s.objs.store.Stats()
	out = append(out, pprofout.MetaComment("unwind_tables", strconv.Itoa(st.Objects)),
		pprofout.MetaComment("unwind_table_bytes", strconv.FormatInt(st.Bytes+st.ProcBytes, 10)),
		// Rescans asked for by walks that met a pc in no known mapping:
		// prompts = rescans + deferred (processes backed off because
		// their rescans found nothing new: a corrupt stack).
		pprofout.MetaComment("unwind_rescan_prompts", u(st.RescanPrompts)),
		pprofout.MetaComment("unwind_rescans", u(st.Rescans)),
		pprofout.MetaComment("unwind_rescans_unchanged", u(st.RescansUnchanged)),
		pprofout.MetaComment("unwind_rescans_deferred", u(st.RescansDeferred)))
	return out
}

// ProcessCount is the number of processes whose state (symbols, fault
// counts, resident-before figures) the session holds: targets, and exited
// ones until they are reclaimed (with Options.DropExited) or forever.
func (s *Session) ProcessCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.procs)
}
