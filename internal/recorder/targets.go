// Targets: following processes, cgroups and commands, attaching to them
// and keeping the state of the ones that exit.

package recorder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/procmaps"
)

// Objects lists the allocator objects attached so far.
func (s *Session) Objects() []*attach.Object {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*attach.Object
	for _, o := range s.objects {
		out = append(out, o)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

func (s *Session) noteObjects(objs []*attach.Object) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, o := range objs {
		s.objects[o.ID] = o
	}
}

// attachCommand runs with the command stopped at exec (the first one, or a
// later exec of another program by a process of the command's tree: the
// old program's state is kept with no live blocks, and the new one is
// attached as a new target before it runs).
func (s *Session) attachCommand(pid int, libs []string, reexec bool) error {
	if !s.enterHook() {
		return nil
	}
	defer s.hookMu.RUnlock()
	if reexec {
		s.replaceImage(pid, false)
	}
	objs, err := s.att.Files(pid, libs)
	if err == nil && len(objs) == 0 {
		switch {
		case strippedStatic(libs[0]):
			err = fmt.Errorf("command %s: %w: %s is a static executable without a symbol table (stripped), so its malloc cannot be found; build it without stripping (no -s, no strip), or link it dynamically", s.opts.Command[0], attach.ErrNoAllocator, libs[0])
		case reexec:
			err = fmt.Errorf("command %s: %w among the libraries it loads (%v)", libs[0], attach.ErrNoAllocator, libs)
		default:
			s.opts.Notify(fmt.Sprintf("%s maps no allocator memprof knows (%v); following it and its children in case they run a program that does", libs[0], libs))
		}
	}
	if err != nil {
		if reexec {
			cause := skipAttachFailed
			if errors.Is(err, attach.ErrNoAllocator) {
				cause = skipNoAllocator
			}
			s.countTarget(cause)
			s.recordErr(fmt.Errorf("attach after exec of process %d: %w", pid, err))
			s.opts.Notify(fmt.Sprintf("process %d now runs %s: not profiled: %v", pid, libs[0], err))
			return nil
		}
		return err
	}
	if s.opts.AtExec != nil && !reexec {
		s.opts.AtExec(pid)
	}
	s.noteObjects(objs)
	t := &target{pid: pid, comm: procmaps.Comm(pid), cgroup: memoryCgroup(pid), allocator: allocatorOf(objs)}
	t.start, _ = procmaps.StartTime(pid)
	t.cov = fullCoverage(pid, "started by memprof")
	if reexec {
		t.cov.how = "recorded from its exec of " + libs[0]
	}
	t.cov.traced = true
	s.setupStacks(t, hostObjects(libs))
	if sp, err := s.sym.Snapshot(pid); err == nil {
		t.sym = sp
	}
	s.mu.Lock()
	s.procs[pid] = t
	s.mu.Unlock()
	if reexec {
		s.opts.Notify(fmt.Sprintf("process %d now runs %s", pid, libs[0]))
	}
	return nil
}

// commandExiting runs with the command stopped in its exit: the address
// space is still there to read.
func (s *Session) commandExiting(pid int) {
	if !s.enterHook() {
		return // the session's maps are gone; the command outlived it
	}
	defer s.hookMu.RUnlock()
	if s.opts.AtExit != nil {
		s.opts.AtExit(pid)
	}
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if t != nil && t.sym != nil {
		_ = t.sym.Refresh() // its errors are named in the profile (Errors)
	}
	if t != nil {
		// RSS is still intact in the exit stop: keep it for the
		// fragmentation verdict.
		if pm, err := frag.ReadProcess(pid); err == nil {
			t.exitMem = &pm
			if r, err := s.regions(t); err == nil {
				t.cov.exitRegions = &r
			}
		}
	}
	s.exit(pid, "exited", false, nil)
}

func (s *Session) addPid(pid int) error { return s.addTarget(pid, "") }

// addTarget attaches to pid, found through the cgroup directory via ("" if
// named by pid).
func (s *Session) addTarget(pid int, via string) error {
	_, err := s.attachTarget(pid, via)
	return err
}

// attachTarget is addTarget telling whether it attached now (false: the
// process was known already, or an error). addMu serializes it, so a
// process found by two scans at once is attached once.
func (s *Session) attachTarget(pid int, via string) (added bool, err error) {
	s.addMu.Lock()
	defer s.addMu.Unlock()
	s.mu.Lock()
	_, known := s.procs[pid]
	if !known {
		s.attaching[pid] = false // set by an exec event during the attach
	}
	s.mu.Unlock()
	if known {
		return false, nil
	}
	defer func() {
		s.mu.Lock()
		execed := s.attaching[pid]
		delete(s.attaching, pid)
		t := s.procs[pid]
		s.mu.Unlock()
		switch {
		case execed && err != nil:
			// The maps read were perhaps the old program's: the new one
			// is retried by the next scan.
			err = fmt.Errorf("%w (it execed a new program meanwhile: retried)", errExecedDuringAttach)
		case execed && t != nil:
			s.refreshTarget(t) // attach the new program's allocators
			sig := execSignature(pid)
			s.mu.Lock()
			t.cov.execSig = sig // the exec is handled: not one for the polling
			s.mu.Unlock()
		}
	}()
	start, _ := procmaps.StartTime(pid)
	if s.dwarf != nil {
		s.dwarf.prepare(pid) // cfi mode: its unwind tables built before its probes fire
	}
	objs, err := s.att.Process(pid)
	if err != nil {
		s.att.Detach(pid) // what was attached before the error
		s.dropStacks(pid)
		return false, err
	}
	s.noteObjects(objs)
	t := &target{pid: pid, start: start, via: via, comm: procmaps.Comm(pid), cgroup: memoryCgroup(pid), lastMap: time.Now(),
		mapping: mapState{next: time.Now().Add(mapCheckMin), gap: mapCheckMin}}
	t.allocator, _ = frag.DetectAllocator(pid, nil)
	if t.allocator == frag.Unknown || t.allocator == frag.Glibc {
		if a := allocatorOf(objs); a != frag.Unknown {
			t.allocator = a
		}
	}
	t.cov = attachedCoverage(pid, "attached to the running process")
	t.cov.execSig = execSignature(pid)
	if slices.Contains(s.opts.Pids, pid) && !s.opts.FollowChildren {
		if kids := childrenOf(pid); len(kids) > 0 {
			s.opts.Notify(fmt.Sprintf("process %d has %d child process(es) %v: they are not profiled (pass --follow-children to include them)", pid, len(kids), kids))
		}
	}
	sp, err := s.sym.Snapshot(pid)
	if err != nil {
		s.att.Detach(pid)
		return false, err
	}
	t.sym = sp
	s.setupStacks(t, nil)
	s.mu.Lock()
	s.procs[pid] = t
	s.mu.Unlock()
	return true, nil
}

// setupStacks decides how the target's stacks are taken: CFI unwinding in
// userspace (dwarf mode, or auto mode when the process's own code lacks
// frame pointers somewhere) or the frame-pointer walk in BPF. objects are
// what the process maps or is about to map (nil: read its mappings now).
func (s *Session) setupStacks(t *target, objects []objectFile) {
	if s.dwarf == nil || t.dwarf {
		return
	}
	if s.opts.StackMode == StackAuto {
		if objects == nil {
			objects = objectPaths(t.pid)
		}
		if !s.fp.needsCFI(objects) {
			return
		}
		if err := s.objs.DwarfProcs.Put(uint32(t.pid), uint8(1)); err != nil {
			s.recordErr(fmt.Errorf("process %d: enable stack copies: %w", t.pid, err))
			return
		}
	}
	if err := s.dwarf.addProcess(t.pid, objects); err != nil {
		s.recordErr(fmt.Errorf("process %d: prepare unwinding: %w", t.pid, err))
	}
	t.dwarf = true
}

// dropStacks forgets a target's unwinding state.
func (s *Session) dropStacks(pid int) {
	if s.dwarf == nil {
		return
	}
	s.dwarf.removeProcess(pid)
	_ = s.objs.DwarfProcs.Delete(uint32(pid)) // absent unless it copied stacks
}

// scanCgroup adds the processes of a cgroup not seen yet. A pid known
// under another start time was reused: the old process's exit is handled
// and the new one attached. A process that cannot be profiled is skipped,
// counted by cause and remembered (so it is not retried) while it runs;
// the first error that is neither is returned after the scan.
func (s *Session) scanCgroup(dir string) (int, error) {
	pids, err := cgroups.Procs(dir, true)
	if err != nil {
		return 0, fmt.Errorf("list processes of cgroup %s: %w", dir, err)
	}
	n := 0
	var firstErr error
	for _, pid := range pids {
		s.mu.Lock()
		t := s.procs[pid]
		s.mu.Unlock()
		if t != nil {
			// With process events, a target's exit (and so a reused pid)
			// is told: no liveness read per known process per scan.
			if s.watch != nil || alive(t) {
				continue
			}
			// Gone, and the pid perhaps reused already.
			if t.skipped {
				s.mu.Lock()
				if s.procs[pid] == t {
					delete(s.procs, pid)
				}
				s.mu.Unlock()
			} else {
				s.exit(pid, "exited", false, nil)
			}
			// Listed while exiting, or its pid reused already: attach only
			// another process running under that pid.
			if start, running := procmaps.StartTime(pid); !running || start == t.start {
				continue
			}
		}
		counted := s.seen(pid, dir)
		if counted {
			// Counted already as exited before attach: by its exit event
			// before any scan saw it, or by an earlier scan that found it
			// gone. It can still be listed, and even have its memory: the
			// BPF exit event comes early in the exit (recent kernels trace
			// sched_process_exit before exit_mm) and wakes the loop, and
			// a process leaves cgroup.procs only at the end of its exit.
			// Attaching what is left of it would count it twice.
			continue
		}
		start, running := procmaps.StartTime(pid)
		if !running {
			s.countGone(pid)
			continue
		}
		added, err := s.attachTarget(pid, dir)
		if err != nil {
			if errors.Is(err, errExecedDuringAttach) {
				continue
			}
			cause := skipAttachFailed
			switch {
			case !alive(&target{pid: pid, start: start}) || exiting(pid):
				cause = skipGoneAtAttach
			case errors.Is(err, attach.ErrNoAllocator):
				cause = skipNoAllocator
			}
			if cause == skipGoneAtAttach {
				s.countGone(pid)
				continue
			}
			s.countTarget(cause)
			// Not profilable (e.g. a Go program) or failing: remember it so
			// it is not retried while it runs, and say so once.
			s.mu.Lock()
			s.procs[pid] = &target{pid: pid, start: start, via: dir, comm: procmaps.Comm(pid), skipped: true}
			s.mu.Unlock()
			s.opts.Notify(fmt.Sprintf("skipping process %d: %v", pid, err))
			if cause == skipAttachFailed && firstErr == nil {
				firstErr = fmt.Errorf("attach to process %d in %s: %w", pid, dir, err)
			}
			continue
		}
		if !added {
			continue // another scan attached it meanwhile
		}
		n++
		s.opts.Notify(fmt.Sprintf("attached to process %d (%s) in %s", pid, procmaps.Comm(pid), dir))
	}
	return n, firstErr
}

func (s *Session) loop(ctx context.Context) {
	// With the kernel's process events, forks, execs and exits are told
	// (watchProcs): the loop looks at the cgroups and targets they name
	// when woken, and at everything only every Options.Rescan (cgroups: a
	// process moved in from outside makes no event) and liveCheckEvents
	// (targets: a safety net), so its cost follows the events, not the
	// number of targets; its ticks then only time the mapping checks, once
	// per liveCheck.
	events := s.watch != nil
	period := s.opts.Poll
	if events {
		period = max(period, liveCheck)
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	var gate rescanGate
	var lastLive, lastFull, lastRescan, lastExecCheck time.Time
	for {
		woken := false
		select {
		case <-ctx.Done():
			return
		case <-s.done:
			return
		case <-tick.C:
		case <-s.wake:
			woken = true
		}
		now := time.Now()
		s.mu.Lock()
		dirs := s.scanDirs
		s.scanDirs = map[string]bool{}
		full := s.fullCheck
		s.fullCheck = false
		// Execs of unknown processes are looked at when told (one
		// /proc/PID/cgroup read each), or, when more of them are waiting
		// than cgroups are followed, by one rescan of every cgroup at most
		// once per execCheckEvery.
		var execed map[int]bool
		cgs := s.opts.Cgroups
		if n := len(s.execed); n > 0 && (n <= len(cgs) || now.Sub(lastExecCheck) >= execCheckEvery) {
			execed, s.execed = s.execed, map[int]bool{}
			if n > len(cgs) {
				lastExecCheck = now
			}
		}
		s.mu.Unlock()
		// Without process events, the cgroups are re-listed when a
		// process was created on the host (rescanGate).
		if cgs := s.Cgroups(); len(cgs) > 0 {
			var scan []string
			switch {
			case !events:
				if woken || gate.due(now) {
					scan = cgs
				}
			case full || dirs[""] || now.Sub(lastRescan) >= s.opts.Rescan:
				scan = cgs
				lastRescan = now
			case len(execed) > len(cgs):
				scan = cgs // more cgroup reads than a rescan
				lastRescan = now
			default:
				for pid := range execed {
					if cg := followedCgroupOf(pid, cgs); cg != "" {
						dirs[cg] = true
					}
				}
				for _, cg := range cgs {
					if dirs[cg] {
						scan = append(scan, cg)
					}
				}
			}
			for _, cg := range scan {
				if _, err := s.scanCgroup(cg); err != nil {
					s.recordErr(err)
				}
			}
		}
		s.endScan()
		if s.opts.DropExited && time.Since(s.lastPrune) > PruneInterval {
			s.pruneStacks()
		}
		if !woken && !full && time.Since(lastLive) < liveCheck {
			continue
		}
		lastLive = now
		// every: look at every target's liveness and program (without
		// events, or as the safety net); otherwise only at those an event
		// named, until they are seen gone or the event is old.
		every := !events || full || now.Sub(lastFull) >= liveCheckEvents
		if every {
			lastFull = now
			s.forgetSkipped(nil)
		}
		s.mu.Lock()
		named := make(map[int]bool, len(s.pendingPids))
		for pid, at := range s.pendingPids {
			named[pid] = true
			if now.Sub(at) > 2*time.Second {
				delete(s.pendingPids, pid) // alive still (a leader thread's exit): the safety net follows it
			}
		}
		s.mu.Unlock()
		if !every && len(named) > 0 {
			s.forgetSkipped(named)
		}
		live := s.liveTargets()
		s.watchCalls(live)
		if s.opts.FollowChildren {
			s.followChildren(live)
		}
		for _, t := range live {
			if t.cov.traced {
				s.checkMappings(t, true)
				continue // the tracer sees its exit
			}
			if every || named[t.pid] {
				if !alive(t) {
					s.exit(t.pid, "exited", false, nil)
					s.donePending(t.pid)
					continue
				}
				if s.checkExec(t) {
					s.donePending(t.pid)
					continue
				}
			}
			s.checkMappings(t, false)
		}
	}
}

// followedCgroupOf returns the followed cgroup directory (of cgs) that
// process pid's memory cgroup is, or is under; "" if none (or pid is gone).
func followedCgroupOf(pid int, cgs []string) string {
	rel := memoryCgroup(pid)
	if rel == "" {
		return ""
	}
	dir := cgroupDir(rel)
	for _, cg := range cgs {
		if r, err := filepath.Rel(cg, dir); err == nil && (r == "." || r != ".." && !strings.HasPrefix(r, "../")) {
			return cg
		}
	}
	return ""
}

// execCheckEvery spaces the rescans for bursts of execs of processes not
// known.
const execCheckEvery = time.Second

// liveCheckEvents is how often, with process events, the loop looks at
// every target's liveness and program anyway (events are never lost
// silently, but a thread group leader may exit before its threads).
var liveCheckEvents = 10 * time.Second

// donePending forgets the event pending for pid (handled).
func (s *Session) donePending(pid int) {
	s.mu.Lock()
	delete(s.pendingPids, pid)
	s.mu.Unlock()
}

// checkExec handles an exec of target t, told by a process event or found
// by its program's signature; it reports whether t's image was replaced.
func (s *Session) checkExec(t *target) bool {
	s.mu.Lock()
	execed, sig0 := t.execed, t.cov.execSig
	s.mu.Unlock()
	if sig0 != "" {
		// The program's signature confirms an exec event (one for
		// an exec before the attach may arrive after it) and, with
		// no process events (or some lost), finds an exec itself.
		// An exiting process has no exe link and no code left
		// (startcode 0): that is no exec.
		sig := execSignature(t.pid)
		exe, code, _ := strings.Cut(sig, "@")
		switch {
		case sig == sig0 && execed:
			s.mu.Lock()
			t.execed = false
			s.mu.Unlock()
			execed = false
		case !execed:
			execed = exe != "" && code != "" && code != "0" && sig != sig0 && !exiting(t.pid) && alive(t)
		}
	}
	if execed {
		s.replaceImage(t.pid, true)
	}
	return execed
}

// refreshSymbols makes pid's symbolizer take the mappings the process has
// now. Mappings it has seen are kept after they go (dlclose), so frames of
// an unloaded library stay symbolized.
func (s *Session) refreshSymbols(pid int) {
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if t != nil && t.sym != nil {
		_ = t.sym.Refresh() // its errors are named in the profile (Errors)
	}
}

// refreshTarget picks up allocators loaded since the attach (dlopen, or an
// exec during it) and new mappings for symbols and unwinding.
func (s *Session) refreshTarget(t *target) {
	if objs, err := s.att.Process(t.pid); err == nil {
		s.noteObjects(objs)
	}
	if t.sym != nil {
		_ = t.sym.Refresh() // its errors are named in the profile (Errors)
	}
	if t.dwarf {
		s.dwarf.refresh(t.pid)
	} else {
		s.setupStacks(t, nil) // a library without frame pointers loaded since?
	}
	t.lastMap = time.Now()
}

// liveTargets lists the targets whose exit has not been handled.
func (s *Session) liveTargets() []*target {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*target
	for _, t := range s.procs {
		if !t.skipped {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

// Running reports whether any target is still alive (or, in cgroup mode,
// whether the session should keep waiting for new processes).
func (s *Session) Running() bool {
	if cgs := s.Cgroups(); len(cgs) > 0 {
		for _, cg := range cgs {
			if _, err := os.Stat(cg); err == nil {
				return true
			}
		}
		return false
	}
	return len(s.liveTargets()) > 0
}

// Targets lists the targets attached now (pid: command name).
func (s *Session) Targets() map[int]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int]string{}
	for pid, t := range s.procs {
		if !t.skipped {
			out[pid] = t.comm
		}
	}
	return out
}

// Exclude detaches a process, drops its state and keeps it from being
// attached again (through its cgroup) while it lives: the agent's overhead
// budget.
func (s *Session) Exclude(pid int, why string) {
	// No scan may attach pid again between its removal and the marker
	// (attachTarget holds addMu; lock order: addMu, then exitMu).
	s.addMu.Lock()
	defer s.addMu.Unlock()
	s.Forget(pid)
	start, _ := procmaps.StartTime(pid)
	s.mu.Lock()
	s.procs[pid] = &target{pid: pid, start: start, comm: procmaps.Comm(pid), skipped: true}
	s.targetCounts[skipExcluded]++
	s.mu.Unlock()
	s.opts.Notify(fmt.Sprintf("process %d detached: %s", pid, why))
}

// forgetSkipped drops the processes remembered only so they are not
// retried (no allocator, excluded) once they are gone; only: the pids to
// look at (nil: every skipped process).
func (s *Session) forgetSkipped(only map[int]bool) {
	s.mu.Lock()
	var skipped []int
	for pid, t := range s.procs {
		if t.skipped && (only == nil || only[pid]) {
			skipped = append(skipped, pid)
		}
	}
	s.mu.Unlock()
	for _, pid := range skipped {
		s.mu.Lock()
		t := s.procs[pid]
		s.mu.Unlock()
		if t != nil && !alive(t) {
			s.mu.Lock()
			if s.procs[pid] == t {
				delete(s.procs, pid)
			}
			delete(s.pendingPids, pid)
			s.mu.Unlock()
		}
	}
}

// memoryCgroup returns the memory cgroup of pid as a path relative to the
// hierarchy root (v1 memory controller where mounted, else the v2 path).
func memoryCgroup(pid int) string {
	v1, v2, err := cgroups.OfProcess(pid)
	if err != nil {
		return ""
	}
	if v1 != "" {
		return v1
	}
	return v2
}

// cgroupDir returns the absolute directory of a relative memory cgroup path.
func cgroupDir(rel string) string {
	v1, v2 := cgroups.Root()
	if v1 != "" {
		return filepath.Join(v1, rel)
	}
	return filepath.Join(v2, rel)
}

// allocatorOf names the allocator from the objects attached before exec
// (jemalloc, tcmalloc or mimalloc win over glibc: when both are mapped,
// the other was preloaded or linked in ahead of libc).
func allocatorOf(objs []*attach.Object) frag.Allocator {
	a := frag.Unknown
	for _, o := range objs {
		switch o.Allocator {
		case "jemalloc":
			return frag.Jemalloc
		case "tcmalloc":
			return frag.Tcmalloc
		case "mimalloc":
			return frag.Mimalloc
		case "glibc", "static":
			a = frag.Glibc
		}
	}
	return a
}

// Cgroups lists the cgroup directories being followed.
func (s *Session) Cgroups() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.opts.Cgroups...)
}

// AddCgroup starts following a cgroup: its processes now and later.
func (s *Session) AddCgroup(dir string) error {
	s.mu.Lock()
	for _, c := range s.opts.Cgroups {
		if c == dir {
			s.mu.Unlock()
			return nil
		}
	}
	s.opts.Cgroups = append(s.opts.Cgroups, dir)
	s.mu.Unlock()
	s.followID(dir)
	_, err := s.scanCgroup(dir)
	return err
}

// RemoveCgroup stops following a cgroup and detaches from its processes
// (their state is dropped).
func (s *Session) RemoveCgroup(dir string, pids []int) {
	s.mu.Lock()
	kept := s.opts.Cgroups[:0]
	for _, c := range s.opts.Cgroups {
		if c != dir {
			kept = append(kept, c)
		}
	}
	s.opts.Cgroups = kept
	for id, d := range s.cgIDs {
		if d == dir {
			delete(s.cgIDs, id)
		}
	}
	s.mu.Unlock()
	for _, pid := range pids {
		s.Forget(pid)
	}
	s.ReleaseExited(dir, 0)
}

// AddPid starts profiling one more process.
func (s *Session) AddPid(pid int) error { return s.addPid(pid) }

// Forget detaches from a process and drops its state (the agent's budget
// uses it to drop a target that costs too much).
func (s *Session) Forget(pid int) {
	s.exitMu.Lock()
	defer s.exitMu.Unlock()
	if s.closed() {
		return
	}
	s.mu.Lock()
	t := s.procs[pid]
	delete(s.procs, pid)
	s.mu.Unlock()
	if t == nil {
		t = &target{pid: pid}
	}
	s.release(t)
}
