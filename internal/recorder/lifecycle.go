// The target lifecycle: a target's exit is handled once, by one function
// (exit), whoever notices it first — the polling loop, the command's exit
// stop, an OOM kill, a reused pid, or a profile about to be built — and the
// state it leaves is complete before anyone can read the session's state.

package recorder

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/procwatch"
	"github.com/memprof/memprof/pprofout"
)

// keptTarget is the state of a target that is gone (exited, OOM-killed, or
// replaced by exec), kept for the profile: its samples are symbolized when
// it goes, so nothing of the process (files, links, BPF entries) is held
// after it.
type keptTarget struct {
	pid       int
	start     uint64 // start time (clock ticks after boot): with pid, the identity
	comm      string
	cgroup    string // memory cgroup, relative to the hierarchy root
	via       string // cgroup directory it was found through ("" for --pid, a command)
	why       string // "exited", "was OOM-killed", ...
	samples   []pprofout.Sample
	live      uint64 // unsampled live bytes of samples
	allocator frag.Allocator
	exitMem   *frag.ProcessMem // memory read in a command's exit stop
	cov       coverage         // heap coverage (exitRegions: read in the exit stop)
	notes     []string         // what memprof could not see of it (finalNotes)
	seq       uint64           // order of the exits handled, from 1
	at        time.Time        // when its exit was handled
	// unloaded mappings its symbolizer held at its exit, and those it had
	// to drop (symbolize.MaxGoneMappings)
	goneKept    int
	goneDropped uint64
}

// MaxKeptExited bounds the exited targets whose state a session that drops
// exited targets (the agent) keeps until they are released
// (ReleaseExited); the oldest go first and are counted as
// targets_lost_kept_state_bound.
var MaxKeptExited = 4096

// Causes of targets not profiled (skipped) or not profiled completely,
// counted per cause and reported as targets_<cause> in the profile's
// comments and the summary.
const (
	skipNoAllocator  = "skipped_no_allocator"         // no allocator memprof can probe (Go, a shell)
	skipGoneAtAttach = "skipped_exited_before_attach" // seen by a scan or forked in a cgroup, gone before attach
	skipAttachFailed = "skipped_attach_failed"
	skipExcluded     = "skipped_excluded"            // detached by the agent's budget
	lostUnreadable   = "lost_state_unreadable"       // the state of a target that went could not be read
	lostKeptBound    = "lost_kept_state_bound"       // MaxKeptExited reached
	execReplaced     = "exec_replaced_image"         // images replaced by exec (their blocks are no longer live)
	lostProcEvents   = "lost_process_event_overruns" // process events dropped by the kernel (socket or ring full)
	lostProcEventsN  = "lost_process_events"         // process events dropped (BPF source: exact)
)

// countTarget adds one to a target count (the caller holds no lock).
func (s *Session) countTarget(cause string) {
	s.mu.Lock()
	s.targetCounts[cause]++
	s.mu.Unlock()
}

// TargetCounts returns the targets skipped, lost or replaced, by cause
// (skipped_no_allocator, skipped_exited_before_attach,
// skipped_attach_failed, skipped_excluded, lost_state_unreadable,
// lost_kept_state_bound, exec_replaced_image, and the process events
// lost: lost_process_event_overruns, lost_process_events with the BPF
// source); causes with no count are absent.
func (s *Session) TargetCounts() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]uint64{}
	for k, v := range s.targetCounts {
		if v > 0 {
			out[k] = v
		}
	}
	return out
}

// Exited counts the targets that went during the recording and whose state
// is kept in the profile.
func (s *Session) Exited() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.kept)
}

// alive tells whether the process t was attached to still runs: the pid
// exists, is not a zombie, and started when t did (else the pid was reused).
func alive(t *target) bool {
	start, ok := procmaps.StartTime(t.pid)
	return ok && (t.start == 0 || start == t.start)
}

// exiting tells whether pid has released its memory map (it is exiting,
// though not a zombie yet): it maps nothing.
func exiting(pid int) bool {
	maps, err := procmaps.Read(pid)
	return err != nil || len(maps) == 0
}

// exit handles the end of a target: its sampled state is read, symbolized
// and kept (or, for a session that drops exited targets, kept until
// released), and everything held for it — probes, BPF map entries,
// unwinding state, open files — is released. It runs at most once per
// target; a second call (another observer of the same exit) returns once
// the first is done. use, if set, gets the kept state before the target is
// released. onReader is set when called from the BPF event reader itself
// (OOM kills), which cannot wait for itself to drain the ring buffer.
func (s *Session) exit(pid int, why string, onReader bool, use func(*keptTarget)) {
	s.exitMu.Lock()
	defer s.exitMu.Unlock()
	if s.closed() {
		return // everything is released already
	}
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if t == nil || t.skipped {
		return
	}
	s.mu.Lock()
	cov := t.cov
	s.mu.Unlock()
	k := &keptTarget{pid: pid, start: t.start, comm: t.comm, cgroup: t.cgroup, via: t.via, why: why,
		allocator: t.allocator, exitMem: t.exitMem, cov: cov, at: time.Now()}
	snap, err := s.read(func(p uint32) bool { return p == uint32(pid) }, heap.Read, !onReader)
	if err != nil {
		s.recordErr(fmt.Errorf("read state of process %d that %s: %w", pid, why, err))
		s.countTarget(lostUnreadable)
	} else {
		k.samples = s.samples(snap, map[int]*target{pid: t}, nil)
		if t.sym != nil {
			k.goneKept, k.goneDropped = t.sym.Retained()
		}
		s.mu.Lock()
		sr := s.seriesRec
		s.mu.Unlock()
		if sr != nil {
			sr.nameExited(snap, t)
		}
		for _, smp := range k.samples {
			_, b := pprofout.Unsample(smp.InuseCount, smp.Size, s.opts.SampleRate)
			k.live += uint64(max(b, 0))
		}
		// The calls counted for it go with its BPF entries: its notes now.
		var calls map[uint32]uint64
		if !cov.called && cov.unprobed == "" && len(k.samples) == 0 {
			calls, _ = s.objs.ProcCalls()
		}
		k.notes = s.finalNotes(t, calls, map[int]bool{pid: len(k.samples) > 0}, false)
	}
	if use != nil {
		use(k)
	}
	s.release(t)
	s.mu.Lock()
	if s.procs[pid] == t {
		delete(s.procs, pid)
	}
	if err == nil {
		s.exitSeq++
		k.seq = s.exitSeq
		s.kept = append(s.kept, k)
		if s.opts.DropExited && len(s.kept) > MaxKeptExited {
			n := len(s.kept) - MaxKeptExited
			s.kept = append(s.kept[:0], s.kept[n:]...)
			s.targetCounts[lostKeptBound] += uint64(n)
		}
	}
	s.mu.Unlock()
	select {
	case s.exits <- struct{}{}:
	default:
	}
	if s.opts.DropExited {
		s.opts.Notify(fmt.Sprintf("process %d (%s) %s", pid, t.comm, why))
		return
	}
	s.opts.Notify(fmt.Sprintf("process %d (%s) %s; its heap as it stood then is kept in the profile", pid, t.comm, why))
}

// closed tells whether Close was called.
func (s *Session) closed() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// release detaches a target and frees what memprof holds for it: probes,
// its BPF map entries, unwinding state and the files held for symbols.
func (s *Session) release(t *target) {
	s.att.Detach(t.pid)
	if _, err := heap.Forget(heap.FromObjects(&s.objs.MemprofObjects), uint32(t.pid)); err != nil {
		s.recordErr(fmt.Errorf("forget the blocks of process %d: %w", t.pid, err))
	}
	if err := s.objs.ForgetProc(uint32(t.pid)); err != nil {
		s.recordErr(fmt.Errorf("forget process %d: %w", t.pid, err))
	}
	s.dropStacks(t.pid)
	if t.sym != nil {
		t.sym.Close()
	}
}

// settle handles the exit of every target that is gone but not noticed yet,
// so a profile built now holds their state (called before the state is
// read).
func (s *Session) settle() {
	for _, t := range s.liveTargets() {
		// A command in its exit stop is alive (traced, not a zombie): the
		// tracer handles its exit there, with its memory still readable.
		if !alive(t) {
			s.exit(t.pid, "exited", false, nil)
		}
	}
}

// recentlyKept returns the last kept state of pid if its exit was handled
// within d (nil otherwise).
func (s *Session) recentlyKept(pid int, d time.Duration) *keptTarget {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.kept) - 1; i >= 0; i-- {
		if k := s.kept[i]; k.pid == pid {
			if time.Since(k.at) <= d {
				return k
			}
			return nil
		}
	}
	return nil
}

// keptSamples returns the samples of the kept targets only selects (nil:
// all), and the sequence number of the last exit kept so far.
func (s *Session) keptSamples(only func(*keptTarget) bool) ([]pprofout.Sample, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []pprofout.Sample
	for _, k := range s.kept {
		if only == nil || only(k) {
			for _, smp := range k.samples {
				smp.Labels = copyLabels(smp.Labels)
				out = append(out, smp)
			}
		}
	}
	return out, s.exitSeq
}

func copyLabels(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// ReleaseExited drops the kept state of the targets that exited after
// being found through the cgroup directory dir, up to the exit mark that
// ProfileOfCgroups returned (0: all): the agent, once it has saved the
// container's profile that includes them.
func (s *Session) ReleaseExited(dir string, mark uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	kept := s.kept[:0]
	for _, k := range s.kept {
		if k.via != dir || (mark != 0 && k.seq > mark) {
			kept = append(kept, k)
		}
	}
	clear(s.kept[len(kept):])
	s.kept = kept
}

// ProfileOfCgroups builds the profile of the targets found through the
// cgroup directories dirs: the live ones as they are now, and the ones that
// exited as they were then (until ReleaseExited). mark is the exit mark to
// pass to ReleaseExited to drop exactly the exited targets included.
func (s *Session) ProfileOfCgroups(dirs ...string) (p *pprofout.Profile, mark uint64, err error) {
	in := map[string]bool{}
	for _, d := range dirs {
		in[d] = true
	}
	s.mu.Lock()
	pids := map[uint32]bool{}
	for pid, t := range s.procs {
		if !t.skipped && in[t.via] {
			pids[uint32(pid)] = true
		}
	}
	s.mu.Unlock()
	return s.profile(func(p uint32) bool { return pids[p] }, func(k *keptTarget) bool { return in[k.via] })
}

// targetComments records the target counts in profile comments.
func targetComments(counts map[string]uint64, exited int) []string {
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := []string{pprofout.MetaComment("targets_exited_kept", strconv.Itoa(exited))}
	for _, k := range keys {
		out = append(out, pprofout.MetaComment("targets_"+k, strconv.FormatUint(counts[k], 10)))
	}
	return out
}

// famEntry is a process forked by a process of a followed cgroup (so in
// that cgroup too, unless moved) or seen by a scan, remembered a while so
// that its exit before attach is counted exactly once whichever of the
// scan and the process events sees it first.
type famEntry struct {
	at    time.Time
	state int    // famForked, famSeen or famCounted
	via   string // the followed cgroup its parent was found through ("": unknown)
}

const (
	famForked  = iota // announced by a fork event, not seen by a scan yet
	famSeen           // seen by a scan (attached, skipped or counted there)
	famCounted        // counted as exited before attach (exit event before any scan saw it, or a scan found it gone)
)

// errExecedDuringAttach: the process execed while memprof attached to it.
var errExecedDuringAttach = errors.New("process execed during the attach")

// maxFamily bounds the forked processes remembered between two scans.
const maxFamily = 1 << 16

// watchProcs follows the kernel's process events: a fork by a process of
// a followed cgroup wakes a scan of that cgroup at once (and is
// remembered, so its child's exit before any scan saw it is counted, not
// missed silently), as does a process moved into a followed cgroup (BPF
// source); an exec or exit of a target wakes the loop to look at that
// target. The work is left to the loop so the events are always read
// quickly; what the loop does is O(events), not O(targets). Cgroup events
// and execs go to Options.CgroupEvents too.
func (s *Session) watchProcs() {
	var lost uint64
	for {
		evs, err := s.watch.Read()
		if errors.Is(err, procwatch.ErrOverrun) {
			s.countTarget(lostProcEvents)
			if s.watch.Source() == procwatch.SourceBPF {
				n := s.watch.Lost()
				s.mu.Lock()
				s.targetCounts[lostProcEventsN] += n - lost
				s.mu.Unlock()
				lost = n
			}
			s.mu.Lock()
			s.fullCheck = true // events lost: look at everything
			s.mu.Unlock()
			s.poke()
			continue
		}
		if err != nil {
			return
		}
		poke := false
		s.mu.Lock()
		for _, e := range evs {
			if e.Pid != e.Tgid && e.Kind != procwatch.Exec { // an exec by any thread replaces the image
				continue // threads
			}
			switch e.Kind {
			case procwatch.Fork:
				p := s.procs[e.ParentTgid]
				pf := s.family[e.ParentTgid]
				if (p != nil && (p.via != "" || p.skipped) || pf != nil && pf.state != famCounted) &&
					s.family[e.Tgid] == nil && s.procs[e.Tgid] == nil && len(s.family) < maxFamily {
					via := ""
					if p != nil {
						via = p.via
					} else {
						via = pf.via
					}
					s.family[e.Tgid] = &famEntry{at: time.Now(), state: famForked, via: via}
					s.scanDirs[via] = true
					poke = true
				}
			case procwatch.CgroupAttach:
				_, in1 := s.cgIDs[e.Memcg]
				_, in2 := s.cgIDs[e.Cgroup]
				if (e.Memcg != 0 && in1 || e.Cgroup != 0 && in2) && s.procs[e.Tgid] == nil {
					if in1 {
						s.scanDirs[s.cgIDs[e.Memcg]] = true
					} else {
						s.scanDirs[s.cgIDs[e.Cgroup]] = true
					}
					poke = true
				}
			case procwatch.Exec:
				if _, ok := s.attaching[e.Tgid]; ok {
					s.attaching[e.Tgid] = true
				}
				if s.procs[e.Tgid] == nil && len(s.opts.Cgroups) > 0 && len(s.execed) < maxFamily {
					// Moved into a followed cgroup from outside, then
					// exec'd (runc): the loop looks at its cgroup.
					s.execed[e.Tgid] = true
					poke = true
				}
				// The command's tree: the tracer sees its execs.
				if t := s.procs[e.Tgid]; t != nil && !t.cov.traced {
					if t.skipped {
						// A new program: it may have an allocator now
						// (the next scan of its cgroup attaches it).
						delete(s.procs, e.Tgid)
						s.scanDirs[t.via] = true
					} else {
						t.execed = true
						s.pendingPids[e.Tgid] = time.Now()
					}
					poke = true
				}
			case procwatch.Exit:
				if s.procs[e.Tgid] != nil {
					// The event comes before the process is a zombie (what
					// alive checks): look again shortly after.
					s.pendingPids[e.Tgid] = time.Now()
					poke = true
					time.AfterFunc(20*time.Millisecond, s.poke)
					time.AfterFunc(200*time.Millisecond, s.poke)
				}
				if f := s.family[e.Tgid]; f != nil && f.state == famForked {
					f.state, f.at = famCounted, time.Now()
					s.targetCounts[skipGoneAtAttach]++
				}
			}
		}
		s.mu.Unlock()
		if poke {
			s.poke()
		}
		if f := s.opts.CgroupEvents; f != nil {
			for _, e := range evs {
				switch e.Kind {
				case procwatch.CgroupMkdir, procwatch.CgroupRmdir, procwatch.CgroupAttach, procwatch.Exec:
					f(e)
				}
			}
		}
		for _, e := range evs {
			switch {
			case e.Kind == procwatch.Exit && e.Pid == e.Tgid && s.opts.ProcessExited != nil:
				s.opts.ProcessExited(e.Tgid)
			case e.Kind == procwatch.Exec && s.opts.ProcessExeced != nil:
				s.opts.ProcessExeced(e.Tgid)
			}
		}
		// Let events gather: on a busy host the next Read then takes many
		// at one wake-up (the BPF ring holds ~4,600, the cn_proc socket ~25,000).
		time.Sleep(eventsCoalesce)
	}
}

// eventsCoalesce is the pause between two reads of process events.
const eventsCoalesce = 50 * time.Millisecond

// followID notes the id of a followed cgroup directory (the events name
// cgroups by id); a directory that cannot be read is left to the scans.
func (s *Session) followID(dir string) {
	id, err := cgroups.ID(dir)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.cgIDs[id] = dir
	s.mu.Unlock()
}

// poke wakes the polling loop.
func (s *Session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// CgroupChanged tells the session that processes may have joined the
// followed cgroup directory dir: it is rescanned at the polling loop's
// next turn instead of at the next periodic rescan (a source of cgroup or
// process events calls it).
func (s *Session) CgroupChanged(dir string) {
	s.mu.Lock()
	s.scanDirs[dir] = true
	s.mu.Unlock()
	s.poke()
}

// seen records that a scan of the followed cgroup via saw pid; it reports
// whether pid's exit before attach was counted already.
func (s *Session) seen(pid int, via string) (counted bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.family[pid]
	switch {
	case f == nil:
		if len(s.family) < maxFamily {
			s.family[pid] = &famEntry{at: time.Now(), state: famSeen, via: via}
		}
	case f.state == famCounted:
		return true
	default:
		f.state, f.at = famSeen, time.Now()
	}
	return false
}

// countGone counts pid as exited before attach, found so by a scan, once:
// later scans that still list it (an exiting process stays in cgroup.procs
// until the end of its exit, and the BPF exit event makes the loop look
// early) skip it (seen reports it counted).
func (s *Session) countGone(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.targetCounts[skipGoneAtAttach]++
	if f := s.family[pid]; f != nil {
		f.state, f.at = famCounted, time.Now()
	} else if len(s.family) < maxFamily {
		s.family[pid] = &famEntry{at: time.Now(), state: famCounted}
	}
}

// endScan forgets the processes seen or counted more than two seconds ago
// (process events arrive within milliseconds), and forked ones never seen
// for a minute (moved out of the cgroup, or their exit event lost).
func (s *Session) endScan() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for pid, f := range s.family {
		if (f.state != famForked && now.Sub(f.at) > 2*time.Second) || now.Sub(f.at) > time.Minute {
			delete(s.family, pid)
		}
	}
}

// replaceImage handles an exec of a target: the old image's state is kept
// with no live blocks (its heap went with it; its allocations stay counted)
// and released, and the new image is attached as a new target when it
// uses an allocator memprof knows.
func (s *Session) replaceImage(pid int, attachNew bool) {
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if t == nil || t.skipped {
		return
	}
	s.exit(pid, "replaced its program by exec; the old program's blocks are no longer live", false, func(k *keptTarget) {
		for i := range k.samples {
			k.samples[i].InuseCount = 0
		}
		k.live = 0
	})
	s.countTarget(execReplaced)
	if !attachNew {
		return
	}
	added, err := s.attachTarget(pid, t.via)
	if err != nil {
		cause := skipAttachFailed
		if errors.Is(err, attach.ErrNoAllocator) {
			cause = skipNoAllocator
		}
		s.countTarget(cause)
		start, _ := procmaps.StartTime(pid)
		s.mu.Lock()
		s.procs[pid] = &target{pid: pid, start: start, via: t.via, comm: procmaps.Comm(pid), skipped: true}
		s.mu.Unlock()
		s.opts.Notify(fmt.Sprintf("process %d execed %s: not profiled: %v", pid, procmaps.Comm(pid), err))
		return
	}
	s.mu.Lock()
	if nt := s.procs[pid]; added && nt != nil {
		nt.cov.how = fmt.Sprintf("attached after it exec'd %s (%s before)", nt.comm, t.cov.how)
	}
	s.mu.Unlock()
	s.opts.Notify(fmt.Sprintf("process %d now runs %s: attached", pid, procmaps.Comm(pid)))
}
