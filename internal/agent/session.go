package agent

import (
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procwatch"
	"github.com/memprof/memprof/internal/recorder"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// heapSession is what the agent uses of the allocator tier's recording
// session: *recorder.Session in production (Run starts it), a fake in the
// unit tests of discovery, budget, OOM handling and retention. The
// methods keep the recorder's contracts (see internal/recorder).
type heapSession interface {
	// AddCgroup follows the processes of a cgroup directory (and below);
	// RemoveCgroup stops following it and detaches from pids.
	AddCgroup(dir string) error
	RemoveCgroup(dir string, pids []int)
	// Targets are the processes with probes, pid -> comm; TargetCounts
	// the processes not profiled, by cause.
	Targets() map[int]string
	TargetCounts() map[string]uint64
	// Exclude detaches from pid for good, why reported.
	Exclude(pid int, why string)
	// Counts is the sampled state (bucket counts by pid, stack and size).
	Counts() (*heap.Snapshot, error)
	// ProcCalls are the allocator calls per target pid since it attached.
	ProcCalls() (map[uint32]uint64, error)
	// Counters are the node-wide BPF counters (calls, losses by cause).
	Counters() (bpfload.Counters, error)
	// MapStats are the fill levels of the bounded BPF maps.
	MapStats() []bpfload.MapStat
	// ProfileOfCgroups is the heap profile of the processes in dirs (all
	// targets without dirs) with the processes exited since the last
	// ReleaseExited(dir, mark) of each.
	ProfileOfCgroups(dirs ...string) (p *pprofout.Profile, mark uint64, err error)
	ReleaseExited(dir string, mark uint64)
	// UnwindTables are the CFI tables the RSS tier walks with too (nil
	// without CFI stacks: the RSS tier then builds its own).
	UnwindTables() *unwindtable.Shared
	// CgroupChanged rescans cgroup dir (discovery found new processes in
	// it) at the session loop's next turn.
	CgroupChanged(dir string)
	// ProcEvents tells where process and cgroup events come from
	// (procwatch.SourceBPF, or the cn_proc fallback).
	ProcEvents() procwatch.Source
}

// rssSession is what the agent uses of the RSS tier's session:
// *rss.Session in production, a fake in unit tests.
type rssSession interface {
	AddCgroup(dir string) error
	RemoveCgroup(dir string)
	// Profile is the RSS profile of the processes only accepts.
	Profile(only func(pid uint32) bool) (*pprofout.RSSProfile, []rss.ProcSummary, error)
	Close()
	// CgroupChanged rescans cgroup dir at the next turn; ProcessExited
	// and ProcessExeced pass on process events (reclaim an exited
	// process's state, re-read an exec'd one's mappings).
	CgroupChanged(dir string)
	ProcessExited(pid int)
	ProcessExeced(pid int)
}

var (
	_ heapSession = (*recorder.Session)(nil)
	_ rssSession  = (*rss.Session)(nil)
)
