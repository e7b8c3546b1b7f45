// Coverage: how much of a target's live heap the recording can see, the
// process tree of a command, and targets that allocate through something
// memprof does not probe.

package recorder

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
)

// coverage says whether every block live in a target went through the
// probes, and watches for a target whose allocator memprof does not see.
type coverage struct {
	// complete: the recording saw the process start (memprof started it,
	// or it was forked from a process with complete coverage and got a
	// copy of its parent's blocks, or it exec'd under memprof's eyes).
	complete bool
	// how says how the process came under the probes, for the report.
	how string
	// preAttach bounds the bytes of blocks allocated before the attach: the
	// writable allocator memory the process had mapped then (brk heap,
	// glibc arenas, other anonymous writable mappings). Only for
	// incomplete coverage.
	preAttach uint64
	// traced: a process of the command's tree (its exit and execs are
	// seen by the tracer).
	traced bool

	// Calls watch: anonymous RSS and the time when it was attached.
	since    time.Time
	rss0     uint64
	unprobed string    // set once the target is found allocating unseen
	called   bool      // an allocator call was seen: no more watching
	watched  time.Time // last check (at most one a second)
	execSig  string    // execSignature when attached (--pid: an exec is noticed by polling)
	// exitRegions: the anonymous memory split, read in the exit stop.
	exitRegions *frag.Regions
}

// The calls watch: a target that made no allocator call memprof saw for
// UnprobedAfter while its anonymous RSS grew by more than UnprobedGrowth
// allocates through something memprof does not probe.
var (
	UnprobedAfter  = 3 * time.Second
	UnprobedGrowth = uint64(4 << 20)
)

// fullCoverage is the coverage of process pid seen from its start; its
// anonymous RSS now (a forked child shares its parent's) is where the calls
// watch starts.
func fullCoverage(pid int, how string) coverage {
	return coverage{complete: true, how: how, since: time.Now(), rss0: rssAnon(pid)}
}

// attachedCoverage is the coverage of a process memprof attached to while
// it ran: blocks it allocated before are not seen.
func attachedCoverage(pid int, how string) coverage {
	c := coverage{how: how, since: time.Now()}
	if pm, err := frag.ReadProcess(pid); err == nil {
		c.rss0 = pm.RssAnon
	}
	if maps, err := procmaps.Read(pid); err == nil {
		c.preAttach = frag.WritableAnon(maps)
	}
	return c
}

func rssAnon(pid int) uint64 {
	pm, err := frag.ReadProcess(pid)
	if err != nil {
		return 0
	}
	return pm.RssAnon
}

// describe says in words what the profile holds of the target's heap.
func (c coverage) describe() string {
	if c.complete {
		return "complete: " + c.how
	}
	return fmt.Sprintf("partial: %s; blocks allocated before the attach are not in the profile (up to %s of allocator memory was mapped then)", c.how, human(c.preAttach))
}

func human(b uint64) string { return frag.Human(b) }

// commandForked runs with parent stopped in fork and child not yet run: the
// child gets a copy of its parent's sampled live blocks (fork copies the
// heap) and its own probes.
func (s *Session) commandForked(parent, child int, vfork bool) {
	if !s.enterHook() {
		return
	}
	defer s.hookMu.RUnlock()
	s.mu.Lock()
	pt := s.procs[parent]
	s.mu.Unlock()
	cov := fullCoverage(child, fmt.Sprintf("forked by process %d under the probes", parent))
	if pt != nil && !pt.cov.complete {
		rss0 := cov.rss0
		cov = pt.cov
		cov.how = fmt.Sprintf("forked by process %d (%s)", parent, pt.cov.how)
		cov.rss0, cov.unprobed, cov.called = rss0, "", false
	}
	if !vfork {
		// vfork's child shares its parent's memory until it execs.
		if _, err := heap.CopyLive(heap.FromObjects(&s.objs.MemprofObjects), uint32(parent), uint32(child)); err != nil {
			s.recordErr(err)
			cov.complete = false
			cov.how += "; not all of its parent's blocks could be copied"
		}
	}
	cov.traced = true
	cov.since = time.Now()
	objs, err := s.att.Process(child)
	if err != nil {
		s.recordErr(fmt.Errorf("follow process %d forked by %d: %w", child, parent, err))
	}
	s.noteObjects(objs)
	t := &target{pid: child, comm: procmaps.Comm(child), cgroup: memoryCgroup(child), lastMap: time.Now(), cov: cov}
	t.start, _ = procmaps.StartTime(child)
	if pt != nil {
		t.allocator = pt.allocator
	}
	if sp, err := s.sym.Snapshot(child); err == nil {
		t.sym = sp
	}
	s.setupStacks(t, nil)
	s.mu.Lock()
	s.procs[child] = t
	s.mu.Unlock()
	s.opts.Notify(fmt.Sprintf("following process %d (%s), forked by %d", child, t.comm, parent))
}

// enterHook starts a tracer hook: false when the session is closed (the
// command outlived it). Otherwise the caller must s.hookMu.RUnlock().
func (s *Session) enterHook() bool {
	s.hookMu.RLock()
	if s.closed() {
		s.hookMu.RUnlock()
		return false
	}
	return true
}

// strippedStatic reports whether the executable at path is static (no
// program interpreter) and has no symbol table: its allocator, if any,
// cannot be found.
func strippedStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return f.Section(".symtab") == nil
}

// watchCalls checks the targets that made no allocator call memprof saw:
// if their anonymous RSS grew meanwhile, they allocate through something
// memprof does not probe, and the user is told once.
func (s *Session) watchCalls(targets []*target) {
	var calls map[uint32]uint64
	for _, t := range targets {
		if t.cov.unprobed != "" || t.cov.called || time.Since(t.cov.since) < UnprobedAfter || time.Since(t.cov.watched) < time.Second {
			continue
		}
		t.cov.watched = time.Now()
		if calls == nil {
			var err error
			if calls, err = s.objs.ProcCalls(); err != nil {
				return
			}
		}
		if calls[uint32(t.pid)] > 0 {
			t.cov.called = true
			continue
		}
		rss := rssAnon(t.pid)
		if rss > t.cov.rss0+UnprobedGrowth {
			msg := unprobedMessage(t, rss-t.cov.rss0, time.Since(t.cov.since))
			s.mu.Lock()
			t.cov.unprobed = msg
			s.mu.Unlock()
			s.opts.Notify(fmt.Sprintf("process %d (%s): %s", t.pid, t.comm, msg))
		}
	}
}

func unprobedMessage(t *target, growth uint64, d time.Duration) string {
	return fmt.Sprintf("no allocator call seen in %s while its anonymous memory grew by %s: it allocates through something memprof does not probe (its own mmap arena, a runtime's heap, or an allocator memprof did not recognise); the profile does not show that memory",
		d.Round(time.Second), human(growth))
}

// finalNotes are what the report says about a target beyond its verdict:
// its coverage, allocations memprof did not see, children not followed.
// sampled tells the processes with samples in the profile (the call
// counts of exited processes are gone).
// running is false for a target whose exit is being handled (its children,
// if any, are not looked for).
func (s *Session) finalNotes(t *target, calls map[uint32]uint64, sampled map[int]bool, running bool) []string {
	var notes []string
	s.mu.Lock()
	unprobed := t.cov.unprobed
	s.mu.Unlock()
	if unprobed != "" {
		notes = append(notes, unprobed)
	} else if calls[uint32(t.pid)] == 0 && !t.cov.called && !sampled[t.pid] {
		notes = append(notes, "no allocator call was seen for this process: if it allocated, it did so through something memprof does not probe (memory from its own mmap, a runtime's heap, or an unrecognised allocator)")
	}
	if len(s.opts.Pids) > 0 && !s.opts.FollowChildren && running {
		if kids := childrenOf(t.pid); len(kids) > 0 {
			notes = append(notes, fmt.Sprintf("its %d child process(es) %v are not profiled: --pid follows the given processes only; pass --follow-children to include them", len(kids), kids))
		}
	}
	return notes
}

// childrenOf lists the child processes of pid (/proc/PID/task/*/children),
// at most 1000.
func childrenOf(pid int) []int {
	dir := filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "task")
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []int
	for i, task := range tasks {
		if i >= 10000 {
			break
		}
		b, err := readBounded(filepath.Join(dir, task.Name(), "children"), 64<<10)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil && len(out) < 1000 {
				out = append(out, n)
			}
		}
	}
	return out
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, limit)
	n, err := f.Read(buf)
	if n > 0 {
		return buf[:n], nil
	}
	return nil, err
}

// followChildren attaches to the children of the --pid targets not
// followed yet (--follow-children); found after they started, their
// coverage is partial.
func (s *Session) followChildren(targets []*target) {
	for _, t := range targets {
		for _, kid := range childrenOf(t.pid) {
			s.mu.Lock()
			_, known := s.procs[kid]
			s.mu.Unlock()
			if known {
				continue
			}
			added, err := s.attachTarget(kid, "")
			if err != nil {
				if errors.Is(err, errExecedDuringAttach) {
					continue // attached again at the next poll
				}
				// Counted by cause as a cgroup's processes are: a child
				// gone (or a zombie) once, silently; one that cannot be
				// profiled once, remembered while it runs.
				start, running := procmaps.StartTime(kid)
				if !running || exiting(kid) {
					s.mu.Lock()
					f := s.family[kid]
					counted := f != nil && f.state == famCounted
					s.mu.Unlock()
					if !counted {
						s.countGone(kid)
					}
					continue
				}
				cause := skipAttachFailed
				if errors.Is(err, attach.ErrNoAllocator) {
					cause = skipNoAllocator
				}
				s.countTarget(cause)
				s.mu.Lock()
				s.procs[kid] = &target{pid: kid, start: start, comm: procmaps.Comm(kid), skipped: true}
				s.mu.Unlock()
				s.opts.Notify(fmt.Sprintf("skipping process %d, child of %d: %v", kid, t.pid, err))
				continue
			}
			if !added {
				continue
			}
			s.mu.Lock()
			if nt := s.procs[kid]; nt != nil {
				nt.cov.how = fmt.Sprintf("child of process %d, attached while it ran", t.pid)
			}
			s.mu.Unlock()
			s.opts.Notify(fmt.Sprintf("following process %d (%s), child of %d", kid, procmaps.Comm(kid), t.pid))
		}
	}
}

// execSignature identifies the program a process runs: its executable and
// where its code starts (different after every exec, with ASLR).
func execSignature(pid int) string {
	exe, _ := os.Readlink(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "exe"))
	b, err := readBounded(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "stat"), 4096)
	if err != nil {
		return exe
	}
	// startcode is field 26; fields after the ") " that closes comm.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		f := strings.Fields(s[i+1:])
		if len(f) > 23 {
			return exe + "@" + f[23]
		}
	}
	return exe
}
