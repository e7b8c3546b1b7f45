// Targets: following processes, cgroups and commands, attaching to them
// and keeping the state of the ones that exit.

package recorder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
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
// later exec of another program by the same process).
func (s *Session) attachCommand(pid int, libs []string, reexec bool) error {
	objs, err := s.att.Files(pid, libs)
	if err != nil {
		if reexec {
			s.recordErr(fmt.Errorf("attach after exec of process %d: %w", pid, err))
			return nil
		}
		return err
	}
	if reexec {
		s.noteObjects(objs)
		s.mu.Lock()
		t := s.procs[pid]
		s.mu.Unlock()
		if t != nil {
			t.comm = procmaps.Comm(pid)
			if a := allocatorOf(objs); a != frag.Unknown {
				t.allocator = a
			}
			if t.sym != nil {
				t.sym.Refresh()
			}
			if t.dwarf {
				s.dwarf.refresh(pid)
			} else {
				s.setupStacks(t, libs)
			}
		}
		s.opts.Notify(fmt.Sprintf("process %d now runs %s", pid, libs[0]))
		return nil
	}
	if len(objs) == 0 {
		return fmt.Errorf("command %s: %w among the libraries it loads (%v)", s.opts.Command[0], attach.ErrNoAllocator, libs)
	}
	s.noteObjects(objs)
	t := &target{pid: pid, comm: procmaps.Comm(pid), cgroup: memoryCgroup(pid), allocator: allocatorOf(objs)}
	s.setupStacks(t, libs)
	if sp, err := s.sym.Snapshot(pid); err == nil {
		t.sym = sp
	}
	s.mu.Lock()
	s.procs[pid] = t
	s.mu.Unlock()
	return nil
}

// commandExiting runs with the command stopped in its exit: the address
// space is still there to read.
func (s *Session) commandExiting(pid int) {
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if t != nil && t.sym != nil {
		t.sym.Refresh()
	}
	if t != nil {
		// RSS is still intact in the exit stop: keep it for the
		// fragmentation verdict.
		if pm, err := frag.ReadProcess(pid); err == nil {
			t.exitMem = &pm
		}
	}
	s.freeze(pid, "exited", nil)
}

func (s *Session) addPid(pid int) error {
	_, err := s.attachPid(pid)
	return err
}

// attachPid is addPid telling whether it attached now (false: the process
// was a target already, or an error).
func (s *Session) attachPid(pid int) (bool, error) {
	s.addMu.Lock()
	defer s.addMu.Unlock()
	s.mu.Lock()
	_, known := s.procs[pid]
	s.mu.Unlock()
	if known {
		return false, nil
	}
	objs, err := s.att.Process(pid)
	if err != nil {
		return false, err
	}
	s.noteObjects(objs)
	t := &target{pid: pid, comm: procmaps.Comm(pid), cgroup: memoryCgroup(pid), mapping: mapState{next: time.Now().Add(mapCheckMin), gap: mapCheckMin}}
	t.allocator, _ = frag.DetectAllocator(pid, nil)
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
// the host paths of what the process maps or is about to map (nil: read its
// mappings now).
func (s *Session) setupStacks(t *target, objects []string) {
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
	if err := s.dwarf.addProcess(t.pid); err != nil {
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
	s.objs.DwarfProcs.Delete(uint32(pid))
}

// scanCgroup adds the processes of a cgroup not seen yet.
func (s *Session) scanCgroup(dir string) (int, error) {
	pids, err := cgroups.Procs(dir, true)
	if err != nil {
		return 0, fmt.Errorf("list processes of cgroup %s: %w", dir, err)
	}
	n := 0
	for _, pid := range pids {
		s.mu.Lock()
		_, known := s.procs[pid]
		s.mu.Unlock()
		if known {
			continue
		}
		added, err := s.attachPid(pid)
		if err != nil {
			if errors.Is(err, attach.ErrNoAllocator) || !procmaps.Alive(pid) {
				// Not profilable (e.g. a Go program) or gone already:
				// remember it so it is not retried, and say so once.
				s.mu.Lock()
				s.procs[pid] = &target{pid: pid, comm: procmaps.Comm(pid), exited: true, skipped: true}
				s.mu.Unlock()
				s.opts.Notify(fmt.Sprintf("skipping process %d: %v", pid, err))
				continue
			}
			return n, err
		}
		if !added {
			continue // another scan attached it meanwhile
		}
		n++
		s.opts.Notify(fmt.Sprintf("attached to process %d (%s) in %s", pid, procmaps.Comm(pid), dir))
	}
	return n, nil
}

func (s *Session) loop(ctx context.Context) {
	tick := time.NewTicker(s.opts.Poll)
	defer tick.Stop()
	var gate rescanGate
	var lastLive time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.done:
			return
		case <-tick.C:
		}
		if cgs := s.Cgroups(); len(cgs) > 0 && gate.due(time.Now()) {
			for _, cg := range cgs {
				if _, err := s.scanCgroup(cg); err != nil {
					s.recordErr(err)
				}
			}
		}
		if time.Since(lastLive) < liveCheck {
			continue
		}
		lastLive = time.Now()
		if s.opts.DropExited {
			s.forgetSkipped()
			if time.Since(s.lastPrune) > PruneInterval {
				s.pruneStacks()
			}
		}
		for _, t := range s.liveTargets() {
			if s.cmd != nil && t.pid == s.cmd.pid {
				s.checkMappings(t, true)
				continue // the tracer sees its exit
			}
			if !procmaps.Alive(t.pid) {
				s.freeze(t.pid, "exited", nil)
				continue
			}
			s.checkMappings(t, false)
		}
	}
}

func (s *Session) liveTargets() []*target {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*target
	for _, t := range s.procs {
		if !t.exited {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

// freeze keeps the sampled state of a target that is gone (its blocks as
// they were at exit), detaches it and reclaims its BPF map entries.
// use, if set, gets the state read at that moment while the target (and
// its symbols) is still known, before DropExited forgets it.
func (s *Session) freeze(pid int, why string, use func(*heap.Snapshot)) {
	s.mu.Lock()
	t := s.procs[pid]
	if t == nil || t.exited {
		s.mu.Unlock()
		return
	}
	t.exited = true
	s.mu.Unlock()
	snap, err := s.readState(func(p uint32) bool { return p == uint32(pid) })
	if err != nil {
		s.recordErr(fmt.Errorf("read state of exited process %d: %w", pid, err))
	} else if use != nil {
		use(snap)
	}
	if err == nil && !s.opts.DropExited {
		s.mu.Lock()
		s.frozen.Merge(snap)
		s.mu.Unlock()
	}
	s.att.Detach(pid)
	heap.Forget(heap.FromObjects(&s.objs.MemprofObjects), uint32(pid))
	s.objs.ForgetProc(uint32(pid))
	s.dropStacks(pid)
	if s.opts.DropExited {
		s.mu.Lock()
		delete(s.procs, pid)
		s.mu.Unlock()
		if t.sym != nil {
			t.sym.Close()
		}
		s.opts.Notify(fmt.Sprintf("process %d (%s) %s", pid, t.comm, why))
		return
	}
	s.opts.Notify(fmt.Sprintf("process %d (%s) %s; its heap as it stood then is kept in the profile", pid, t.comm, why))
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

// Targets lists the pids seen (alive or not) with their command names.
func (s *Session) Targets() map[int]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int]string{}
	for pid, t := range s.procs {
		if !t.exited {
			out[pid] = t.comm
		}
	}
	return out
}

// Exclude detaches a process, drops its state and keeps it from being
// attached again (through its cgroup) while it lives: the agent's overhead
// budget.
func (s *Session) Exclude(pid int, why string) {
	s.Forget(pid)
	s.mu.Lock()
	s.procs[pid] = &target{pid: pid, comm: procmaps.Comm(pid), exited: true, skipped: true}
	s.mu.Unlock()
	s.opts.Notify(fmt.Sprintf("process %d detached: %s", pid, why))
}

// forgetSkipped drops the processes remembered only so they are not
// retried (no allocator, excluded) once they are gone.
func (s *Session) forgetSkipped() {
	s.mu.Lock()
	var skipped []int
	for pid, t := range s.procs {
		if t.skipped {
			skipped = append(skipped, pid)
		}
	}
	s.mu.Unlock()
	for _, pid := range skipped {
		if !procmaps.Alive(pid) {
			s.mu.Lock()
			if t := s.procs[pid]; t != nil && t.skipped {
				delete(s.procs, pid)
			}
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
// (jemalloc wins over glibc: when both are mapped, jemalloc was preloaded).
func allocatorOf(objs []*attach.Object) frag.Allocator {
	a := frag.Unknown
	for _, o := range objs {
		switch o.Allocator {
		case "jemalloc":
			return frag.Jemalloc
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
	s.mu.Unlock()
	for _, pid := range pids {
		s.Forget(pid)
	}
}

// AddPid starts profiling one more process.
func (s *Session) AddPid(pid int) error { return s.addPid(pid) }

// Forget detaches from a process and drops its state (the agent's budget
// uses it to drop a target that costs too much).
func (s *Session) Forget(pid int) {
	s.mu.Lock()
	t := s.procs[pid]
	delete(s.procs, pid)
	s.mu.Unlock()
	s.att.Detach(pid)
	heap.Forget(heap.FromObjects(&s.objs.MemprofObjects), uint32(pid))
	s.objs.ForgetProc(uint32(pid))
	s.dropStacks(pid)
	if t != nil && t.sym != nil {
		t.sym.Close()
	}
}
