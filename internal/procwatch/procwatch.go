// Package procwatch reports process forks, execs and exits, and the
// creation, removal and joining of cgroups, as the kernel announces them:
// what polling /proc or cgroup.procs misses — a process that lives less
// than a polling interval, an exec, a container's cgroup made between two
// listings — is seen within milliseconds.
//
// Two sources, one API. The default is a set of BPF programs on BTF
// tracepoints (bpf/procevents.bpf.c: sched_process_fork/exec/exit,
// cgroup_mkdir/rmdir/attach_task) that needs CAP_BPF and CAP_PERFMON (what
// the allocation probes need already), reports processes rather than
// threads, and gives each event its v1 memory cgroup and v2 cgroup ids.
// Where the programs cannot be loaded, Open falls back to the netlink
// process events connector (cn_proc, connector.go), which needs
// CAP_NET_ADMIN in the host's network namespace and reports no cgroup
// events. Either can lose events under a burst: Read then returns
// ErrOverrun once and Lost counts them (the caller counts it too).
package procwatch

import (
	"errors"
	"fmt"
)

// Kind is the kind of an event.
type Kind int

// Event kinds: those of the process connector (PROC_EVENT_FORK, _EXEC,
// _EXIT of linux/cn_proc.h), and the cgroup ones only the BPF source has.
const (
	Fork         Kind = iota + 1 // Pid/Tgid: the child; Parent*: the forking task
	Exec                         // Pid/Tgid: the task that execed
	Exit                         // Pid/Tgid: the task that exited (a process when Pid == Tgid)
	CgroupMkdir                  // Memcg or Cgroup: the new cgroup's id; Level its depth
	CgroupRmdir                  // Memcg or Cgroup: the removed cgroup's id
	CgroupAttach                 // Pid/Tgid: a process moved into the cgroup Memcg or Cgroup
)

func (k Kind) String() string {
	switch k {
	case Fork:
		return "fork"
	case Exec:
		return "exec"
	case Exit:
		return "exit"
	case CgroupMkdir:
		return "cgroup_mkdir"
	case CgroupRmdir:
		return "cgroup_rmdir"
	case CgroupAttach:
		return "cgroup_attach"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Event is one event. For Fork, a new process (not a thread) has
// Pid == Tgid; the BPF source reports only those, and an Exit only when
// the process's last thread exits (with Pid = Tgid).
//
// Memcg is the kernfs id (the directory's inode number, as
// cgroups.ID returns) of the v1 memory controller's cgroup, Cgroup the
// cgroup v2 id: of the task for Fork, Exec and Exit, of the cgroup for the
// cgroup kinds (the id of the hierarchy the cgroup is in; the other is 0).
// On a pure v2 host both name the same cgroup. Only the BPF source fills
// them, Start, Time and Level (0 from the connector).
type Event struct {
	Kind                  Kind
	Pid, Tgid             int
	ParentPid, ParentTgid int
	Memcg, Cgroup         uint64
	Start                 uint64 // the task's start, ns since boot (CLOCK_BOOTTIME)
	Time                  uint64 // when it happened, ns of CLOCK_BOOTTIME
	Level                 int    // cgroup kinds: the cgroup's depth (a hierarchy's root is 0)
	// Path: CgroupMkdir and CgroupRmdir, the cgroup's path in its
	// hierarchy ("/kubepods/..."), at most PathMax bytes (longer ones cut).
	Path string
}

// PathMax is the longest Event.Path (PW_PATH_LEN - 1 of procevents.h).
const PathMax = 255

// ErrOverrun is returned by Read when events were lost (the ring buffer
// or the socket's buffer was full); the events around it are returned by
// the next Read.
var ErrOverrun = errors.New("process events lost: the event buffer overflowed")

// Source names where the events come from.
type Source string

// Sources.
const (
	SourceBPF       Source = "bpf"     // BTF tracepoints (procevents.bpf.c)
	SourceConnector Source = "cn_proc" // netlink process events connector
)

// source is one way of reading events.
type source interface {
	read() ([]Event, error)
	close() error
	lost() uint64
}

// Watcher reads events.
type Watcher struct {
	src  source
	kind Source
	// Why the BPF source is not used (nil when it is).
	bpfErr error
}

// Open starts the events from the BPF source, or from the process
// connector if the BPF programs cannot be loaded (BPFError says why). It
// fails when neither can be had.
func Open() (*Watcher, error) {
	b, berr := openBPF(0, defaultWake)
	if berr == nil {
		return &Watcher{src: b, kind: SourceBPF}, nil
	}
	c, cerr := openConnector()
	if cerr != nil {
		return nil, fmt.Errorf("process events: %w; and the fallback: %w", berr, cerr)
	}
	return &Watcher{src: c, kind: SourceConnector, bpfErr: berr}, nil
}

// OpenConnector starts the events from the process connector only.
func OpenConnector() (*Watcher, error) {
	c, err := openConnector()
	if err != nil {
		return nil, err
	}
	return &Watcher{src: c, kind: SourceConnector}, nil
}

// Source tells where the events come from; only SourceBPF has the cgroup
// kinds.
func (w *Watcher) Source() Source { return w.kind }

// BPFError is why the BPF source was not used (nil when it is).
func (w *Watcher) BPFError() error { return w.bpfErr }

// Read blocks until events arrive (or Close) and returns them. After Close
// it returns an error that is not ErrOverrun.
func (w *Watcher) Read() ([]Event, error) { return w.src.read() }

// Lost is the number of events lost so far: exact for the BPF source (the
// ring buffer's drops), the number of overruns for the connector.
func (w *Watcher) Lost() uint64 { return w.src.lost() }

// Close stops the events; a blocked Read returns.
func (w *Watcher) Close() error { return w.src.close() }
