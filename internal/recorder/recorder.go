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
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/procwatch"
	"github.com/memprof/memprof/internal/symbolize"
	"github.com/memprof/memprof/internal/unwindtable"
)

// DefaultSampleRate is the mean number of bytes between samples.
const DefaultSampleRate = 512 * 1024

// MaxSampleRate is the largest sample rate accepted: 1 GiB between samples.
// Above it a process holding less than a few GiB would mostly show no sample
// at all, and the unsampling factor 1/(1-exp(-size/rate)) of small blocks
// (above 10^7 for 64-byte blocks) turns one sample into gigabytes.
const MaxSampleRate = 1 << 30

// Options configure a session.
type Options struct {
	SampleRate uint64        // mean bytes between samples; 1 = every allocation
	Pids       []int         // processes to profile
	Cgroups    []string      // cgroup directories: every process in them, including later ones
	Command    []string      // a command to start with the probes in place
	Env        []string      // its environment (nil: memprof's own)
	Poll       time.Duration // how often targets are rescanned (default 200ms)
	// Rescan is, with the kernel's process events, how often every
	// followed cgroup is re-listed anyway (a process moved in from
	// outside makes no event); default rescanMax. CgroupChanged rescans
	// one cgroup at once.
	Rescan time.Duration
	// ProcessExited, if set, is called with the pid of every process the
	// kernel's process events say exited (any process of the host, not
	// only targets; from the event reader: it must be quick): another
	// tier following the same processes reclaims its state from it.
	ProcessExited func(pid int)
	// ProcessExeced, likewise, with the pid of every process that exec'd.
	ProcessExeced func(pid int)
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
	// StackMode is StackCFI (default), StackFP, StackDwarf or StackAuto.
	StackMode string
	// UnwindTables, with StackCFI, are the RSS tier's unwind tables to
	// walk with (record --rss --heap: one set of tables); nil: its own.
	UnwindTables *unwindtable.Shared
	// ClassicOOM takes OOM kills from the classic tracepoint (pid only, as
	// before Linux 6.8) even where the victim's task is available.
	ClassicOOM bool
	// FollowChildren also profiles the child processes of the Pids
	// targets, found by polling after they started (a command's children
	// are always followed, from their fork).
	FollowChildren bool

	// AtExec and AtExit, if set, are called with the command stopped at
	// its first exec and in its exit (another tier recording the same
	// command: the RSS tier follows it from its first instruction and
	// reads its memory before the kernel unmaps it).
	AtExec, AtExit func(pid int)
	// Symbols is the symbol cache to use (nil: a new one). Sessions may
	// share one: objects are cached by build ID or (device, inode).
	Symbols *symbolize.Cache
	// EventsBytes sizes the BPF ring buffer of OOM events and stack
	// copies (0: 16 MiB; see bpfload.Options).
	EventsBytes uint32
	// CgroupEvents, if set, is called with every cgroup event (mkdir,
	// rmdir, a process moved in) and every exec the process events bring
	// (the agent discovers containers from them). It runs on the reader
	// of the events: it must return quickly and not call into the session.
	CgroupEvents func(procwatch.Event)
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
	staleStacks map[uint64]bool

	// addMu serializes addTarget, so that a process found by two scans at
	// once (AddCgroup and the poll loop) is attached once, not twice.
	addMu sync.Mutex
	// hookMu: the command tracer's hooks hold it (read) while they use
	// the session; Close takes it once so none runs past it.
	hookMu sync.RWMutex

	// exitMu is held for the whole handling of a target's exit (exit) and
	// while the state is read for a profile, so a profile sees every target
	// either live or kept, never neither nor both.
	exitMu sync.Mutex
	exits  chan struct{} // signalled after each exit handled
	wake   chan struct{} // wakes the polling loop (process events)
	watch  *procwatch.Watcher
	// cgIDs: the ids (cgroups.ID) of the followed cgroups, so that a
	// process moved into one wakes the scan.
	cgIDs map[uint64]string
	// family: processes forked in followed cgroups or seen by scans lately
	// (see famEntry).
	family map[int]*famEntry
	// attaching: pids being attached by addTarget, true once they exec.
	attaching map[int]bool
	// What process events (or CgroupChanged) left for the polling loop:
	// followed cgroups to rescan ("": all of them), targets to look at
	// (an exec or exit announced, since when), and a full look at every
	// target and cgroup after events were lost.
	scanDirs    map[string]bool
	pendingPids map[int]time.Time
	// execed: processes not known that exec'd (a container's runc init
	// joins its cgroup, then execs): the loop checks whether they are in
	// a followed cgroup (one /proc/PID/cgroup read each)
	execed    map[int]bool
	fullCheck bool

	mu           sync.Mutex
	procs        map[int]*target // targets running, and skipped processes remembered
	kept         []*keptTarget   // state of targets that went, oldest first
	seriesRec    *SeriesRecorder // the series being recorded (nil: none)
	exitSeq      uint64          // exits kept so far (keptTarget.seq)
	targetCounts map[string]uint64
	objects      map[procmaps.FileID]*attach.Object
	errs         []string
}

type target struct {
	pid     int
	start   uint64 // start time (procmaps.StartTime): with pid, the identity
	comm    string
	cgroup  string // memory cgroup path relative to the hierarchy root
	via     string // cgroup directory it was found through ("" for --pid, a command)
	sym     *symbolize.Process
	lastMap time.Time
	mapping mapState // when its mappings are next looked at (maps.go)
	// allocator of the process, for the fragmentation verdict
	allocator frag.Allocator
	// exitMem is the memory state read in the exit stop of a command.
	exitMem *frag.ProcessMem
	// dwarf: stacks are copied and unwound with CFI in userspace.
	dwarf bool
	// skipped: not profiled (no allocator memprof knows, or excluded),
	// remembered so its cgroup's rescans do not retry it while it runs.
	skipped bool
	// cov: how much of its live heap the recording sees (coverage.go).
	cov coverage
	// execed: the process replaced its program (a process event); the
	// loop keeps the old image's state and attaches the new one.
	execed bool
}

// Start loads the programs and attaches to the targets.
func Start(ctx context.Context, opts Options) (*Session, error) {
	if len(opts.Pids) == 0 && len(opts.Cgroups) == 0 && len(opts.Command) == 0 && !opts.AllowEmpty {
		return nil, errors.New("nothing to record: give --pid, --cgroup, --pod or a command after --")
	}
	if opts.SampleRate == 0 {
		opts.SampleRate = DefaultSampleRate
	}
	if opts.SampleRate > MaxSampleRate {
		return nil, fmt.Errorf("sample rate %d bytes is above the maximum of %d (1 GiB): sampling that sparse shows nothing useful; the default is %d", opts.SampleRate, MaxSampleRate, DefaultSampleRate)
	}
	if opts.Poll == 0 {
		opts.Poll = 200 * time.Millisecond
	}
	if opts.Rescan == 0 {
		opts.Rescan = rescanMax
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
		opts.StackMode = StackCFI
	}
	mode, ok := stackModes[opts.StackMode]
	if !ok {
		return nil, fmt.Errorf("unknown stack mode %q: use cfi, fp, dwarf or auto", opts.StackMode)
	}
	objs, err := bpfload.Load(bpfload.Options{SampleRate: opts.SampleRate, StackMode: mode, ClassicOOM: opts.ClassicOOM, NoSession: opts.NoSession, EventsBytes: opts.EventsBytes, Tables: opts.UnwindTables})
	if err != nil {
		return nil, err
	}
	progs := objs.Programs()
	if opts.PerProbeLinks {
		progs.Multi, progs.MultiReturn, progs.Session = nil, nil, nil
	}
	s := &Session{
		opts:         opts,
		objs:         objs,
		att:          attach.New(progs),
		sym:          opts.Symbols,
		start:        time.Now(),
		done:         make(chan struct{}),
		procs:        map[int]*target{},
		targetCounts: map[string]uint64{},
		objects:      map[procmaps.FileID]*attach.Object{},
	}
	if s.sym == nil {
		s.sym = symbolize.NewCache(symbolize.Options{})
	}
	s.exits = make(chan struct{}, 1)
	s.wake = make(chan struct{}, 1)
	s.family = map[int]*famEntry{}
	s.cgIDs = map[uint64]string{}
	s.attaching = map[int]bool{}
	s.scanDirs = map[string]bool{}
	s.pendingPids = map[int]time.Time{}
	s.execed = map[int]bool{}
	if opts.StackMode != StackFP {
		s.dwarf = newDwarfStacks(objs, s.refreshSymbols)
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
		s.followID(cg)
		if _, err := s.scanCgroup(cg); err != nil {
			// A process that cannot be attached is skipped and counted;
			// the others are recorded.
			s.recordErr(err)
		}
	}
	// Process events before the command starts: loading their BPF
	// programs (kernel BTF, verifier: ~0.1-0.2 s of CPU) while it starts
	// would compete with building its unwind tables, and a tight loop
	// would meanwhile fill the event ring with stack copies
	// (TestCFITightLoop lost up to 245 of 100,000 stacks in 3 of 8 runs).
	if w, err := procwatch.Open(); err == nil {
		s.watch = w
		if berr := w.BPFError(); berr != nil {
			s.recordErr(fmt.Errorf("process events come from the netlink connector (%w): no cgroup events, threads reported too", berr))
		}
		go s.watchProcs()
	} else {
		s.recordErr(fmt.Errorf("%w: processes that live less than a polling interval (%v) are not seen, and an exec is noticed late", err, opts.Poll))
	}
	if len(opts.Command) > 0 {
		env := opts.Env
		if env == nil {
			env = os.Environ()
		}
		cmd, err := startCommand(opts.Command, env, s.attachCommand, s.commandExiting, s.commandForked)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.cmd = cmd
	}
	go s.loop(ctx)
	return s, nil
}

// ProcEvents tells where process events come from (procwatch.SourceBPF or
// SourceConnector), "" when there are none (the session polls).
func (s *Session) ProcEvents() procwatch.Source {
	if s.watch == nil {
		return ""
	}
	return s.watch.Source()
}

// StartTime is when the recording started.
func (s *Session) StartTime() time.Time { return s.start }

// UnwindTables are the heap tier's unwind tables (CFI mode; nil otherwise)
// for the RSS tier to walk with (rss.Options.Unwind): one set per node.
func (s *Session) UnwindTables() *unwindtable.Shared { return s.objs.UnwindTables() }

// Features describes the kernel paths in use.
func (s *Session) Features() bpfload.Features { return s.objs.Features }

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
			// The exit stop kept the state (this waits for it, or handles
			// an exit the tracer saw no stop for).
			s.exit(s.cmd.pid, "exited", false, nil)
			if st.signal != 0 {
				return fmt.Sprintf("command killed by signal %d (%s)", int(st.signal), st.signal)
			}
			return fmt.Sprintf("command exited with status %d", st.code)
		case <-tick.C:
		case <-s.exits:
		}
		// A target leaves the running set only once its state is kept
		// (exit), so the profile built next holds it.
		if s.cmd == nil && !s.Running() {
			return "all targets exited"
		}
	}
}

// Close detaches everything and frees the BPF objects. A command memprof
// started keeps running until memprof exits; it is traced with
// PTRACE_O_EXITKILL, so it does not outlive memprof (as with strace: the
// recording of a command ends with it, or takes it down at --duration).
func (s *Session) Close() {
	select {
	case <-s.done:
		return
	default:
		close(s.done)
	}
	// A barrier: a tracer hook in progress finishes; later ones see done.
	s.hookMu.Lock()
	s.hookMu.Unlock() //nolint:staticcheck // SA2001: the empty critical section is the point
	// An exit being handled finishes before the event reader, maps and
	// links go; later ones see the session closed.
	s.exitMu.Lock()
	defer s.exitMu.Unlock()
	if s.oomStop != nil {
		s.oomStop()
	}
	if s.dwarf != nil {
		s.dwarf.close()
	}
	if s.watch != nil {
		s.watch.Close()
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
