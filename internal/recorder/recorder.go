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

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/symbolize"
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
	// EventsBytes sizes the BPF ring buffer of OOM events and stack
	// copies (0: 16 MiB; see bpfload.Options).
	EventsBytes uint32
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

	// addMu serializes addPid, so that a process found by two scans at
	// once (AddCgroup and the poll loop) is attached once, not twice.
	addMu sync.Mutex

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
	mapping mapState // when its mappings are next looked at (maps.go)
	// allocator of the process, for the fragmentation verdict
	allocator frag.Allocator
	// exitMem is the memory state read in the exit stop of a command.
	exitMem *frag.ProcessMem
	// dwarf: stacks are copied and unwound with CFI in userspace.
	dwarf bool
	// skipped: not profiled (no allocator memprof knows, or excluded),
	// remembered so its cgroup's rescans do not retry it.
	skipped bool
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
	objs, err := bpfload.Load(bpfload.Options{SampleRate: opts.SampleRate, StackMode: mode, ClassicOOM: opts.ClassicOOM, NoSession: opts.NoSession, EventsBytes: opts.EventsBytes})
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
