package agent

import (
	"fmt"
	"sort"
	"sync"

	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procwatch"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// fakeHeap stands for the recorder's session in unit tests: it records what
// the agent asks (cgroups followed and dropped, processes excluded, exit
// marks released) and answers with the state the test sets.
type fakeHeap struct {
	mu sync.Mutex

	// answers
	targets  map[int]string
	calls    map[uint32]uint64
	counters bpfload.Counters
	snap     heap.Snapshot
	profiles map[string]*pprofout.Profile // by cgroup directory
	marks    map[string]uint64            // exit mark returned per directory
	addErr   error

	// what the agent did
	followed map[string]bool   // cgroup directories followed now
	added    []string          // AddCgroup calls, in order
	removed  []string          // RemoveCgroup calls, in order
	excluded map[int]string    // pid -> why
	released map[string]uint64 // dir -> last mark released
	changed  []string          // CgroupChanged calls, in order
}

func newFakeHeap() *fakeHeap {
	return &fakeHeap{
		targets: map[int]string{}, calls: map[uint32]uint64{},
		profiles: map[string]*pprofout.Profile{}, marks: map[string]uint64{},
		followed: map[string]bool{}, excluded: map[int]string{}, released: map[string]uint64{},
	}
}

func (f *fakeHeap) AddCgroup(dir string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.added = append(f.added, dir)
	f.followed[dir] = true // followed even on error, as the recorder does
	return f.addErr
}

func (f *fakeHeap) RemoveCgroup(dir string, pids []int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removed = append(f.removed, dir)
	delete(f.followed, dir)
}

func (f *fakeHeap) Targets() map[int]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[int]string, len(f.targets))
	for k, v := range f.targets {
		out[k] = v
	}
	return out
}

func (f *fakeHeap) TargetCounts() map[string]uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]uint64{}
	for _, why := range f.excluded {
		out[why]++
	}
	return out
}

func (f *fakeHeap) Exclude(pid int, why string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.excluded[pid] = why
	delete(f.targets, pid)
}

func (f *fakeHeap) Counts() (*heap.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.snap
	s.Buckets = append([]heap.Bucket(nil), f.snap.Buckets...)
	return &s, nil
}

func (f *fakeHeap) ProcCalls() (map[uint32]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[uint32]uint64, len(f.calls))
	for k, v := range f.calls {
		out[k] = v
	}
	return out, nil
}

func (f *fakeHeap) Counters() (bpfload.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counters, nil
}

func (f *fakeHeap) MapStats() []bpfload.MapStat {
	return []bpfload.MapStat{{Name: "live", Entries: 1, Capacity: 10}}
}

func (f *fakeHeap) ProfileOfCgroups(dirs ...string) (*pprofout.Profile, uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(dirs) == 0 {
		dirs = make([]string, 0, len(f.profiles))
		for d := range f.profiles {
			dirs = append(dirs, d)
		}
		sort.Strings(dirs)
	}
	out := &pprofout.Profile{SampleRate: 1}
	var mark uint64
	for _, d := range dirs {
		mark = max(mark, f.marks[d])
		p := f.profiles[d]
		if p == nil {
			continue
		}
		out.SampleRate, out.Start, out.Duration = p.SampleRate, p.Start, p.Duration
		for _, s := range p.Samples {
			l := map[string]string{}
			for k, v := range s.Labels {
				l[k] = v
			}
			s.Labels = l
			out.Samples = append(out.Samples, s)
		}
	}
	return out, mark, nil
}

// ProcEvents: the fake's events come from the test.
func (f *fakeHeap) ProcEvents() procwatch.Source { return procwatch.SourceBPF }

// UnwindTables: the fake has no BPF tables.
func (f *fakeHeap) UnwindTables() *unwindtable.Shared { return nil }

func (f *fakeHeap) ReleaseExited(dir string, mark uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.released[dir] = mark
}

// fakeRSS stands for the RSS session: it follows cgroup directories and
// answers Profile with the samples and summaries of the test whose pid the
// filter accepts.
type fakeRSS struct {
	mu       sync.Mutex
	followed map[string]bool
	samples  []pprofout.RSSSample
	sums     []rss.ProcSummary
	closed   bool
	changed  []string // CgroupChanged calls, in order
	exited   []int    // ProcessExited calls
	execed   []int    // ProcessExeced calls
}

func newFakeRSS() *fakeRSS { return &fakeRSS{followed: map[string]bool{}} }

func (f *fakeRSS) AddCgroup(dir string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("closed")
	}
	f.followed[dir] = true
	return nil
}

func (f *fakeRSS) RemoveCgroup(dir string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.followed, dir)
}

func (f *fakeRSS) Profile(only func(pid uint32) bool) (*pprofout.RSSProfile, []rss.ProcSummary, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := &pprofout.RSSProfile{SampleRate: 1}
	var sums []rss.ProcSummary
	for _, s := range f.sums {
		if only(uint32(s.Pid)) {
			sums = append(sums, s)
		}
	}
	for _, s := range f.samples {
		pid := s.Labels["pid"]
		var n uint32
		fmt.Sscan(pid, &n)
		if only(n) {
			l := map[string]string{}
			for k, v := range s.Labels {
				l[k] = v
			}
			s.Labels = l
			p.Samples = append(p.Samples, s)
		}
	}
	return p, sums, nil
}

func (f *fakeRSS) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
}

func (f *fakeRSS) CgroupChanged(dir string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changed = append(f.changed, dir)
}

func (f *fakeRSS) ProcessExited(pid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.exited = append(f.exited, pid)
}

func (f *fakeRSS) ProcessExeced(pid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.execed = append(f.execed, pid)
}

// CgroupChanged: the agent says dir has new processes.
func (f *fakeHeap) CgroupChanged(dir string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changed = append(f.changed, dir)
}

var (
	_ heapSession = (*fakeHeap)(nil)
	_ rssSession  = (*fakeRSS)(nil)
)
