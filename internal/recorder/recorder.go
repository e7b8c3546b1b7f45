// Package recorder runs a profiling session: it loads the BPF programs,
// follows the target processes (by pid, by cgroup, or a command it starts),
// attaches the probes to their allocators, keeps the state of targets that
// exit, and turns the sampled state into a pprof heap profile.
package recorder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/symbolize"
	"github.com/memprof/memprof/pprofout"
)

// DefaultSampleRate is the mean number of bytes between samples.
const DefaultSampleRate = 512 * 1024

// Options configure a session.
type Options struct {
	SampleRate uint64        // mean bytes between samples; 1 = every allocation
	Pids       []int         // processes to profile
	Cgroups    []string      // cgroup directories: every process in them, including later ones
	Command    []string      // a command to start with the probes in place
	Env        []string      // its environment (nil: memprof's own)
	Poll       time.Duration // how often targets are rescanned (default 200ms)
	// Notify receives messages for the user (target exits, new targets, OOM kills).
	Notify func(msg string)
	// OOM, if set, is called for each OOM kill of a target with the
	// victim's frozen state (see oom.go); the session keeps recording the
	// other targets.
	OOM func(*OOMKill)
	// AllOOMs reports OOM kills of processes that are not targets too
	// (without a heap profile).
	AllOOMs bool
	// DropExited discards the state of targets that exit instead of
	// keeping it for the final profile (the agent, which runs forever).
	DropExited bool
	// AllowEmpty starts a session with no target yet (the agent adds
	// cgroups as containers appear).
	AllowEmpty bool
	// PerProbeLinks attaches one perf event per probe even where the
	// kernel has uprobe_multi (the path kernels before 6.6 take).
	PerProbeLinks bool
	// NoSession uses uprobe_multi entry and return links even where the
	// kernel has uprobe sessions (the path kernels before 6.13 take).
	NoSession bool
	// StackMode is StackAuto (default), StackFP or StackDwarf.
	StackMode string
	// ClassicOOM takes OOM kills from the classic tracepoint (pid only, as
	// before Linux 6.8) even where the victim's task is available.
	ClassicOOM bool
}

// Session is one recording.
type Session struct {
	opts    Options
	objs    *bpfload.Objects
	att     *attach.Attacher
	sym     *symbolize.Cache
	start   time.Time
	cmd     *command
	done    chan struct{}
	oomStop func()
	events  *ringbuf.Reader
	dwarf   *dwarfStacks // nil in frame-pointer mode
	fp      fpCache

	// Stack pruning of long-running (DropExited) sessions.
	lastPrune   time.Time
	staleStacks map[uint32]bool

	mu      sync.Mutex
	procs   map[int]*target
	frozen  *heap.Snapshot // state of targets that exited
	objects map[procmaps.FileID]*attach.Object
	errs    []string
}

type target struct {
	pid     int
	comm    string
	cgroup  string // memory cgroup path relative to the hierarchy root
	sym     *symbolize.Process
	exited  bool
	oomed   bool
	lastMap time.Time
	// allocator of the process, for the fragmentation verdict
	allocator frag.Allocator
	// exitMem is the memory state read in the exit stop of a command.
	exitMem *frag.ProcessMem
	// dwarf: stacks are copied and unwound with CFI in userspace.
	dwarf bool
}

// Start loads the programs and attaches to the targets.
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
	if opts.Notify == nil {
		opts.Notify = func(string) {}
	}
	for _, pid := range opts.Pids {
		if !procmaps.Alive(pid) {
			return nil, fmt.Errorf("process %d not found: no such process on this host (check the pid, and that memprof runs in the host's pid namespace)", pid)
		}
	}
	for _, cg := range opts.Cgroups {
		if st, err := os.Stat(cg); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("cgroup %s does not exist: give a directory under /sys/fs/cgroup (for example /sys/fs/cgroup/memory/<path> or /sys/fs/cgroup/<path>)", cg)
		}
	}
	if opts.StackMode == "" {
		opts.StackMode = StackAuto
	}
	mode, ok := map[string]mbpf.MemprofStackMode{
		StackAuto: mbpf.MemprofStackModeSM_AUTO, StackFP: mbpf.MemprofStackModeSM_FP, StackDwarf: mbpf.MemprofStackModeSM_DWARF,
	}[opts.StackMode]
	if !ok {
		return nil, fmt.Errorf("unknown stack mode %q: use auto, fp or dwarf", opts.StackMode)
	}
	objs, err := bpfload.Load(bpfload.Options{SampleRate: opts.SampleRate, StackMode: mode, ClassicOOM: opts.ClassicOOM, NoSession: opts.NoSession})
	if err != nil {
		return nil, err
	}
	progs := objs.Programs()
	if opts.PerProbeLinks {
		progs.Multi, progs.MultiReturn, progs.Session = nil, nil, nil
	}
	s := &Session{
		opts:    opts,
		objs:    objs,
		att:     attach.New(progs),
		sym:     symbolize.NewCache(symbolize.Options{}),
		start:   time.Now(),
		done:    make(chan struct{}),
		procs:   map[int]*target{},
		frozen:  &heap.Snapshot{Stacks: map[uint32][]uint64{}, Memcg: map[uint32]uint64{}},
		objects: map[procmaps.FileID]*attach.Object{},
	}
	if opts.StackMode != StackFP {
		s.dwarf = newDwarfStacks()
	}
	if err := s.startOOM(); err != nil {
		s.Close()
		return nil, err
	}
	for _, pid := range opts.Pids {
		if err := s.addPid(pid); err != nil {
			s.Close()
			return nil, err
		}
	}
	for _, cg := range opts.Cgroups {
		if _, err := s.scanCgroup(cg); err != nil {
			s.Close()
			return nil, err
		}
	}
	if len(opts.Command) > 0 {
		env := opts.Env
		if env == nil {
			env = os.Environ()
		}
		cmd, err := startCommand(opts.Command, env, s.attachCommand, s.commandExiting)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.cmd = cmd
	}
	go s.loop(ctx)
	return s, nil
}

// StartTime is when the recording started.
func (s *Session) StartTime() time.Time { return s.start }

// Features describes the kernel paths in use.
func (s *Session) Features() bpfload.Features { return s.objs.Features }

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
	s.mu.Lock()
	_, known := s.procs[pid]
	s.mu.Unlock()
	if known {
		return nil
	}
	objs, err := s.att.Process(pid)
	if err != nil {
		return err
	}
	s.noteObjects(objs)
	t := &target{pid: pid, comm: procmaps.Comm(pid), cgroup: memoryCgroup(pid), lastMap: time.Now()}
	t.allocator, _ = frag.DetectAllocator(pid, nil)
	sp, err := s.sym.Snapshot(pid)
	if err != nil {
		s.att.Detach(pid)
		return err
	}
	t.sym = sp
	s.setupStacks(t, nil)
	s.mu.Lock()
	s.procs[pid] = t
	s.mu.Unlock()
	return nil
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

// readState reads the sampled state of the processes keep selects, with
// copied stacks resolved.
func (s *Session) readState(keep func(uint32) bool) (*heap.Snapshot, error) {
	if s.events != nil {
		// Let the event reader consume pending stack copies first.
		for i := 0; i < 100 && s.events.AvailableBytes() > 0; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	snap, err := heap.Read(heap.FromObjects(&s.objs.MemprofObjects), keep)
	if err != nil {
		return nil, err
	}
	if s.dwarf != nil {
		s.dwarf.resolve(snap, keep)
	}
	return snap, nil
}

// scanCgroup adds the processes of a cgroup not seen yet.
func (s *Session) scanCgroup(dir string) (int, error) {
	pids, err := cgroups.Procs(dir, true)
	if err != nil {
		return 0, fmt.Errorf("list processes of cgroup %s: %w", dir, err)
	}
	added := 0
	for _, pid := range pids {
		s.mu.Lock()
		_, known := s.procs[pid]
		s.mu.Unlock()
		if known {
			continue
		}
		if err := s.addPid(pid); err != nil {
			if errors.Is(err, attach.ErrNoAllocator) || !procmaps.Alive(pid) {
				// Not profilable (e.g. a Go program) or gone already:
				// remember it so it is not retried, and say so once.
				s.mu.Lock()
				s.procs[pid] = &target{pid: pid, comm: procmaps.Comm(pid), exited: true}
				s.mu.Unlock()
				s.opts.Notify(fmt.Sprintf("skipping process %d: %v", pid, err))
				continue
			}
			return added, err
		}
		added++
		s.opts.Notify(fmt.Sprintf("attached to process %d (%s) in %s", pid, procmaps.Comm(pid), dir))
	}
	return added, nil
}

func (s *Session) loop(ctx context.Context) {
	tick := time.NewTicker(s.opts.Poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.done:
			return
		case <-tick.C:
		}
		for _, cg := range s.Cgroups() {
			if _, err := s.scanCgroup(cg); err != nil {
				s.recordErr(err)
			}
		}
		if s.opts.DropExited && time.Since(s.lastPrune) > PruneInterval {
			s.pruneStacks()
		}
		for _, t := range s.liveTargets() {
			if s.cmd != nil && t.pid == s.cmd.pid {
				if time.Since(t.lastMap) > time.Second && t.sym != nil {
					t.sym.Refresh()
					t.lastMap = time.Now()
				}
				continue // the tracer sees its exit
			}
			if !procmaps.Alive(t.pid) {
				s.freeze(t.pid, "exited", nil)
				continue
			}
			if time.Since(t.lastMap) > time.Second {
				// Pick up allocators loaded with dlopen and new mappings
				// for symbolization.
				if objs, err := s.att.Process(t.pid); err == nil {
					s.noteObjects(objs)
				}
				if t.sym != nil {
					t.sym.Refresh()
				}
				if t.dwarf {
					s.dwarf.refresh(t.pid)
				} else {
					s.setupStacks(t, nil) // a library without frame pointers loaded since?
				}
				t.lastMap = time.Now()
			}
		}
	}
}

func (s *Session) recordErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	msg := err.Error()
	for _, e := range s.errs {
		if e == msg {
			return
		}
	}
	s.errs = append(s.errs, msg)
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

// CommandExit returns the command's exit status channel (nil without a command).
func (s *Session) CommandExit() <-chan cmdExit {
	if s.cmd == nil {
		return nil
	}
	return s.cmd.status
}

// CommandPid is the pid of the command memprof started (0 if none).
func (s *Session) CommandPid() int {
	if s.cmd == nil {
		return 0
	}
	return s.cmd.pid
}

// Wait blocks until the duration passes (0: no limit), ctx is cancelled
// (Ctrl-C), or every target has exited.
func (s *Session) Wait(ctx context.Context, d time.Duration) (reason string) {
	var timeout <-chan time.Time
	if d > 0 {
		timer := time.NewTimer(d)
		defer timer.Stop()
		timeout = timer.C
	}
	tick := time.NewTicker(s.opts.Poll)
	defer tick.Stop()
	cmdDone := s.CommandExit()
	for {
		select {
		case <-ctx.Done():
			return "interrupted"
		case <-timeout:
			return "duration reached"
		case st := <-cmdDone:
			// The exit stop already froze the state.
			s.freeze(s.cmd.pid, "exited", nil)
			if st.signal != 0 {
				return fmt.Sprintf("command killed by signal %d (%s)", int(st.signal), st.signal)
			}
			return fmt.Sprintf("command exited with status %d", st.code)
		case <-tick.C:
			if s.cmd == nil && !s.Running() {
				return "all targets exited"
			}
		}
	}
}

// Counters returns the BPF side's counters.
func (s *Session) Counters() (bpfload.Counters, error) { return s.objs.ReadCounters() }

// Snapshot reads the sampled state of all targets now, including the frozen
// state of the ones that exited.
func (s *Session) Snapshot() (*heap.Snapshot, error) {
	s.mu.Lock()
	live := map[uint32]bool{}
	for pid, t := range s.procs {
		if !t.exited {
			live[uint32(pid)] = true
		}
	}
	s.mu.Unlock()
	snap, err := s.readState(func(p uint32) bool { return live[p] })
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	snap.Merge(s.frozen)
	s.mu.Unlock()
	return snap, nil
}

// Profile builds the heap profile of everything recorded so far.
func (s *Session) Profile() (*pprofout.Profile, error) {
	snap, err := s.Snapshot()
	if err != nil {
		return nil, err
	}
	return s.profileOf(snap, nil)
}

// profileOf turns a snapshot into a profile; only selects processes (nil: all).
func (s *Session) profileOf(snap *heap.Snapshot, only func(pid uint32) bool) (*pprofout.Profile, error) {
	p := &pprofout.Profile{
		SampleRate: s.opts.SampleRate,
		Start:      s.start,
		Duration:   time.Since(s.start),
	}
	unknown := &pprofout.Location{Lines: []pprofout.Line{{Function: "[stack unavailable]"}}}
	truncated := &pprofout.Location{Lines: []pprofout.Line{{Function: "[truncated]"}}}
	s.mu.Lock()
	procs := map[int]*target{}
	for pid, t := range s.procs {
		procs[pid] = t
	}
	s.mu.Unlock()
	for _, b := range snap.Buckets {
		if only != nil && !only(b.Pid) {
			continue
		}
		t := procs[int(b.Pid)]
		var stack []*pprofout.Location
		if addrs, ok := snap.Stacks[b.StackID]; ok && len(addrs) > 0 && t != nil && t.sym != nil {
			stack = t.sym.Locate(addrs)
		}
		if len(stack) == 0 {
			stack = []*pprofout.Location{unknown}
		} else if snap.Truncated[b.StackID] {
			stack = append(stack[:len(stack):len(stack)], truncated)
		}
		labels := map[string]string{"pid": strconv.Itoa(int(b.Pid))}
		if t != nil {
			labels["comm"] = t.comm
			if t.cgroup != "" {
				labels["cgroup"] = t.cgroup
			}
		}
		p.Samples = append(p.Samples, pprofout.Sample{
			Stack:      stack,
			Size:       b.Size,
			AllocCount: b.AllocCount,
			InuseCount: b.InuseCount,
			Labels:     labels,
		})
	}
	c, err := s.objs.ReadCounters()
	if err == nil {
		p.Comments = append(p.Comments, countersComments(c)...)
	}
	p.Comments = append(p.Comments, pprofout.MetaComment("sample_rate", strconv.FormatUint(s.opts.SampleRate, 10)),
		pprofout.MetaComment("stack_mode", s.opts.StackMode))
	if s.dwarf != nil {
		u, tr, full := s.dwarf.stats()
		tables, bytes := s.dwarf.cache.Stats()
		if full > 0 {
			p.Comments = append(p.Comments, pprofout.MetaComment("lost_cfi_alloc_buckets_full", strconv.FormatUint(full, 10)))
		}
		p.Comments = append(p.Comments, pprofout.MetaComment("stacks_unwound", strconv.FormatUint(u, 10)),
			pprofout.MetaComment("stacks_truncated", strconv.FormatUint(tr, 10)),
			pprofout.MetaComment("unwind_tables", strconv.Itoa(tables)),
			pprofout.MetaComment("unwind_table_bytes", strconv.FormatInt(bytes, 10)))
	}
	objects, symBytes := s.sym.Stats()
	p.Comments = append(p.Comments, pprofout.MetaComment("symbol_objects", strconv.Itoa(objects)),
		pprofout.MetaComment("symbol_bytes", strconv.FormatInt(symBytes, 10)))
	s.mu.Lock()
	for _, e := range s.errs {
		p.Comments = append(p.Comments, "memprof error: "+e)
	}
	s.mu.Unlock()
	return p, nil
}

func countersComments(c bpfload.Counters) []string {
	out := []string{
		pprofout.MetaComment("calls", strconv.FormatUint(c.Calls, 10)),
		pprofout.MetaComment("frees", strconv.FormatUint(c.Frees, 10)),
		pprofout.MetaComment("samples", strconv.FormatUint(c.Samples, 10)),
		pprofout.MetaComment("nested_calls", strconv.FormatUint(c.Nested, 10)),
	}
	lost := c.Lost()
	keys := make([]string, 0, len(lost))
	for k := range lost {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, pprofout.MetaComment("lost_"+k, strconv.FormatUint(lost[k], 10)))
	}
	return out
}

// Targets lists the pids seen (alive or not) with their command names.
func (s *Session) Targets() map[int]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int]string{}
	for pid, t := range s.procs {
		out[pid] = t.comm
	}
	return out
}

// Close detaches everything and frees the BPF objects. Child processes that
// memprof started are not killed: they were started by the user's request
// and may still be running after a --duration.
func (s *Session) Close() {
	select {
	case <-s.done:
		return
	default:
		close(s.done)
	}
	if s.oomStop != nil {
		s.oomStop()
	}
	s.att.Close()
	s.mu.Lock()
	for _, t := range s.procs {
		if t.sym != nil {
			t.sym.Close()
		}
	}
	s.mu.Unlock()
	s.objs.Close()
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

// ProcCalls returns the allocator calls counted per target process.
func (s *Session) ProcCalls() (map[uint32]uint64, error) { return s.objs.ProcCalls() }

// ProfileFor builds the profile of the processes only selects, from the
// current state (including kept state of exited ones).
func (s *Session) ProfileFor(only func(pid uint32) bool) (*pprofout.Profile, error) {
	snap, err := s.Snapshot()
	if err != nil {
		return nil, err
	}
	return s.profileOf(snap, only)
}

// Attacher exposes probe statistics (links in place).
func (s *Session) Links() int { return s.att.Links() }

// PruneInterval is how often a long-running session (DropExited) drops the
// stacks nothing refers to any more.
var PruneInterval = 30 * time.Second

// pruneStacks drops unreferenced stacks from the BPF stack map and the
// interned CFI stacks.
func (s *Session) pruneStacks() {
	s.lastPrune = time.Now()
	m := heap.FromObjects(&s.objs.MemprofObjects)
	refs, err := heap.Referenced(m)
	if err != nil {
		s.recordErr(err)
		return
	}
	if s.staleStacks == nil {
		s.staleStacks = map[uint32]bool{}
	}
	heap.PruneStacks(m, refs, s.staleStacks)
	if s.dwarf != nil {
		s.dwarf.prune()
	}
}

// MapStats reports the occupancy of the BPF maps that bound the recording.
func (s *Session) MapStats() []bpfload.MapStat { return s.objs.MapStats() }
