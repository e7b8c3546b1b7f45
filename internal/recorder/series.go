// The memory of a recording over time: live bytes per stack from the
// session's own aggregation of the BPF maps (nothing runs in the target),
// RSS of each target and usage of each recorded cgroup (package series).

package recorder

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// SeriesInterval is the initial spacing of series points; it doubles each
// time series.MaxPoints are reached (so 256 points cover 64 s at 250 ms,
// about 4.5 hours at 64 s).
var SeriesInterval = 250 * time.Millisecond

// seriesCostShare bounds the CPU time memprof spends reading points to
// 1/20 of the time (5% of one core): the interval is at least 20 times the
// moving average (EWMA, weight 1/4) of the CPU time a point takes.
const seriesCostShare = 20

// SeriesRecorder samples a session's memory over time until Stop.
type SeriesRecorder struct {
	s    *Session
	mu   sync.Mutex
	b    *series.Builder
	cost time.Duration // moving average of the time a point takes
	stop chan struct{}
	done chan struct{}

	// exited: frames of the stacks of targets that went, named at their
	// exit (their symbols are released then).
	exitedMu sync.Mutex
	exited   map[series.Key][]string
}

// RecordSeries starts sampling the session's memory: a point now, then one
// per interval (SeriesInterval, doubling as the series fills). Call Stop to
// end it and get the series.
func (s *Session) RecordSeries() *SeriesRecorder {
	r := &SeriesRecorder{s: s, b: series.NewBuilder(s.start, s.opts.SampleRate, SeriesInterval, series.MaxPoints),
		stop: make(chan struct{}), done: make(chan struct{}), exited: map[series.Key][]string{}}
	s.mu.Lock()
	s.seriesRec = r
	s.mu.Unlock()
	go r.loop()
	return r
}

func (r *SeriesRecorder) loop() {
	defer close(r.done)
	// The cost of a point is the CPU time of this thread (RUSAGE_THREAD),
	// not the wall time, which a loaded machine stretches.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tick := time.NewTicker(SeriesInterval / 5)
	defer tick.Stop()
	for {
		r.mu.Lock()
		// Half a tick of slack: a point due between two ticks is taken at
		// the nearer one, not one tick late.
		if now := time.Now(); r.b.Due(now.Add(SeriesInterval / 10)) {
			c0 := threadCPU()
			r.point(now)
			d := threadCPU() - c0
			r.b.Cost(d)
			r.cost += (d - r.cost) / 4 // from 0: one slow first read does not set the pace
			r.b.AtLeast(seriesCostShare * r.cost)
		}
		r.mu.Unlock()
		select {
		case <-r.stop:
			return
		case <-r.s.done:
			return
		case <-tick.C:
		}
	}
}

// point adds one point: called with r.mu held.
func (r *SeriesRecorder) point(now time.Time) {
	s := r.s
	// The targets, their RSS and their live bytes are read with no exit
	// handled in between (an exit releases a target's BPF entries before
	// it leaves the targets: a point could see its RSS but not its heap).
	s.exitMu.Lock()
	defer s.exitMu.Unlock()
	if s.closed() {
		r.b.ReadError()
		return
	}
	targets := s.Targets()
	// /proc and the cgroups first: they are read closest to now (the
	// maps take longer).
	alive := map[int]bool{}
	var procs []series.ProcPoint
	for pid, comm := range targets {
		alive[pid] = true
		rss, anon, ok := readRSS(pid)
		if !ok {
			continue
		}
		procs = append(procs, series.ProcPoint{Pid: pid, Comm: comm, RSS: rss, RssAnon: anon})
	}
	var cgs map[string]int64
	for _, dir := range s.Cgroups() {
		if cgs == nil {
			cgs = map[string]int64{}
		}
		if st, err := cgroups.ReadStats(dir); err == nil {
			cgs[dir] = int64(st.Usage)
		}
	}
	snap, err := s.Counts()
	if err != nil {
		r.b.ReadError()
		return
	}
	live := map[series.Key]int64{}
	for _, b := range snap.Buckets {
		if b.InuseCount == 0 {
			continue
		}
		_, bytes := pprofout.Unsample(b.InuseCount, b.Size, s.opts.SampleRate)
		live[series.Key{Pid: b.Pid, StackID: b.StackID}] += bytes
	}
	r.b.Add(now, live, alive, procs, cgs)
}

// threadCPU is the calling thread's CPU time (user + system).
func threadCPU() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_THREAD, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// readRSS reads VmRSS and RssAnon of /proc/PID/status, in bytes.
func readRSS(pid int) (rss, anon int64, ok bool) {
	data, err := os.ReadFile(filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, 0, false
	}
	var seen int
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() && seen < 2 {
		k, v, found := strings.Cut(sc.Text(), ":")
		if !found || (k != "VmRSS" && k != "RssAnon") {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		if k == "VmRSS" {
			rss = n << 10
		} else {
			anon = n << 10
		}
		seen++
	}
	return rss, anon, seen == 2
}

// Stop ends the sampling and returns the series, its stacks resolved to
// frames as pprofout renders them (the same strings as the rows of
// pprofout.Top on the session's profile). Call it before Close.
func (r *SeriesRecorder) Stop() (*series.Series, error) {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	<-r.done
	s := r.s
	snap, err := s.Snapshot()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	procs := map[int]*target{}
	for pid, t := range s.procs {
		procs[pid] = t
	}
	s.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.b.Finish(func(k series.Key) []string {
		r.exitedMu.Lock()
		f, ok := r.exited[k]
		r.exitedMu.Unlock()
		if ok {
			return f
		}
		return stackFrames(snap, procs[int(k.Pid)], k.StackID)
	}), nil
}

// stackFrames names the frames of stack id of snap with t's symbols.
func stackFrames(snap *heap.Snapshot, t *target, id uint64) []string {
	addrs := snap.Stacks[id]
	if len(addrs) == 0 || t == nil || t.sym == nil {
		return []string{"[stack unavailable]"}
	}
	locs := t.sym.Locate(addrs)
	if len(locs) == 0 {
		return []string{"[stack unavailable]"}
	}
	f := pprofout.Frames(locs)
	if snap.Truncated[id] {
		f = append(f, "[truncated]")
	}
	return f
}

// nameExited names the stacks of t, read at its exit in snap, while its
// symbols are still open (Stop names the others).
func (r *SeriesRecorder) nameExited(snap *heap.Snapshot, t *target) {
	names := map[series.Key][]string{}
	for _, b := range snap.Buckets {
		if int(b.Pid) != t.pid {
			continue
		}
		k := series.Key{Pid: b.Pid, StackID: b.StackID}
		if _, ok := names[k]; !ok {
			names[k] = stackFrames(snap, t, b.StackID)
		}
	}
	r.exitedMu.Lock()
	defer r.exitedMu.Unlock()
	for k, f := range names {
		r.exited[k] = f
	}
}
