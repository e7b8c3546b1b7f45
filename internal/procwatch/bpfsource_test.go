package procwatch

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

const (
	v1Memory = "/sys/fs/cgroup/memory"
	v2Root   = "/sys/fs/cgroup/unified"
)

// collect reads events from w in the background until stop is closed;
// lat returns the delay from each event (Event.Time) to its Read, for the
// BPF source.
func collect(t *testing.T, w *Watcher) (get func() []Event, stop func(), lat func() []time.Duration) {
	t.Helper()
	ch := make(chan []Event, 1024)
	done := make(chan struct{})
	var mu sync.Mutex
	var lats []time.Duration
	go func() {
		defer close(done)
		for {
			evs, err := w.Read()
			if errors.Is(err, ErrOverrun) {
				continue
			}
			if err != nil {
				return
			}
			now := bootNs()
			mu.Lock()
			for _, e := range evs {
				lats = append(lats, time.Duration(now-e.Time))
			}
			mu.Unlock()
			ch <- evs
		}
	}()
	var all []Event
	get = func() []Event {
		for {
			select {
			case evs := <-ch:
				all = append(all, evs...)
			default:
				return all
			}
		}
	}
	lat = func() []time.Duration {
		mu.Lock()
		defer mu.Unlock()
		out := append([]time.Duration(nil), lats...)
		slices.Sort(out)
		return out
	}
	return get, func() { w.Close(); <-done }, lat
}

// waitEvents polls get until ok holds for the events (or 10 s pass).
func waitEvents(get func() []Event, ok func([]Event) bool) []Event {
	deadline := time.Now().Add(10 * time.Second)
	for {
		evs := get()
		if ok(evs) || time.Now().After(deadline) {
			return evs
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func bootNs() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return uint64(ts.Nano())
}

// TestBPFProcessAndCgroupEvents: a cgroup made in the v1 memory hierarchy
// and in the v2 one, a child that moves itself into both and execs, its
// exit, and the cgroups' removal are reported by the BPF source with the
// child's pid, its parent, the cgroups' ids (as cgroups.ID reads them) and
// one start time; a threaded child is reported as one process.
func TestBPFProcessAndCgroupEvents(t *testing.T) {
	testprog.RequireRoot(t)
	w, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	if w.Source() != SourceBPF {
		t.Fatalf("Open used %s (BPF: %v), want the BPF source", w.Source(), w.BPFError())
	}
	get, stop, lat := collect(t, w)
	defer stop()

	name := fmt.Sprintf("memprof-procwatch-%d", os.Getpid())
	t0 := bootNs()
	v1 := kube.MkCgroup(t, v1Memory, name)
	v2 := kube.MkCgroup(t, v2Root, name)
	id1, err1 := cgroups.ID(v1)
	id2, err2 := cgroups.ID(v2)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	cmd := exec.Command("/bin/sh", "-c", fmt.Sprintf("echo $$ > %s && echo $$ > %s && exec /bin/true",
		filepath.Join(v1, "cgroup.procs"), filepath.Join(v2, "cgroup.procs")))
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	kube.RmCgroup(t, v1)
	kube.RmCgroup(t, v2)

	var got map[Kind][]Event
	evs := waitEvents(get, func(evs []Event) bool {
		got = map[Kind][]Event{}
		for _, e := range evs {
			if e.Tgid == pid || e.Memcg == id1 || e.Cgroup == id2 {
				got[e.Kind] = append(got[e.Kind], e)
			}
		}
		return len(got[CgroupRmdir]) >= 2 && len(got[Exit]) >= 1
	})
	t1 := bootNs()
	t.Logf("%d events in all; the child's and its cgroups': %v", len(evs), got)
	one := func(k Kind, match func(Event) bool, what string) *Event {
		var m []Event
		for _, e := range got[k] {
			if match(e) {
				m = append(m, e)
			}
		}
		if len(m) != 1 {
			t.Errorf("%s: %d %s events, want 1 (%v)", what, len(m), k, got[k])
			return nil
		}
		if m[0].Time < t0 || m[0].Time > t1 {
			t.Errorf("%s: event time %d outside the test's [%d, %d] (CLOCK_BOOTTIME ns)", what, m[0].Time, t0, t1)
		}
		return &m[0]
	}
	v1dir := func(e Event) bool { return e.Memcg == id1 && e.Cgroup == 0 }
	v2dir := func(e Event) bool { return e.Cgroup == id2 && e.Memcg == 0 }
	for _, k := range []Kind{CgroupMkdir, CgroupRmdir} {
		if e := one(k, v1dir, "the v1 memory cgroup"); e != nil && (e.Level != 1 || e.Path != "/"+name) {
			t.Errorf("v1 %s: level %d, path %q; want 1, %q", k, e.Level, e.Path, "/"+name)
		}
		if e := one(k, v2dir, "the v2 cgroup"); e != nil && (e.Level != 1 || e.Path != "/"+name) {
			t.Errorf("v2 %s: level %d, path %q; want 1, %q", k, e.Level, e.Path, "/"+name)
		}
	}
	isChild := func(e Event) bool { return e.Pid == pid && e.Tgid == pid }
	one(CgroupAttach, func(e Event) bool { return isChild(e) && v1dir(e) }, "the move into the v1 cgroup")
	one(CgroupAttach, func(e Event) bool { return isChild(e) && v2dir(e) }, "the move into the v2 cgroup")
	fork := one(Fork, isChild, "the child's fork")
	// Two execs: of /bin/sh (by the Go runtime's child) and of /bin/true
	// (by the shell, in the cgroups it moved into).
	ex := one(Exec, func(e Event) bool { return isChild(e) && e.Memcg == id1 }, "the child's exec of /bin/true")
	one(Exec, func(e Event) bool { return isChild(e) && e.Memcg != id1 }, "the child's exec of /bin/sh")
	exit := one(Exit, isChild, "the child's exit")
	if fork == nil || ex == nil || exit == nil {
		return
	}
	if fork.ParentTgid != os.Getpid() {
		t.Errorf("fork: parent %d, want this test (%d)", fork.ParentTgid, os.Getpid())
	}
	ownRel, _, err := cgroups.OfProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	own1, _ := cgroups.ID(filepath.Join(v1Memory, ownRel))
	if fork.Memcg != own1 {
		t.Errorf("fork: memory cgroup %d, want the test's own (%d): the child is born where its parent is", fork.Memcg, own1)
	}
	if ex.Memcg != id1 || ex.Cgroup != id2 || exit.Memcg != id1 || exit.Cgroup != id2 {
		t.Errorf("exec in cgroups (%d, %d), exit in (%d, %d); want (%d, %d), the ones it moved into", ex.Memcg, ex.Cgroup, exit.Memcg, exit.Cgroup, id1, id2)
	}
	if fork.Start == 0 || fork.Start != ex.Start || fork.Start != exit.Start || fork.Start < t0 || fork.Start > fork.Time {
		t.Errorf("start times: fork %d, exec %d, exit %d; want one, after %d and before the fork event (%d)", fork.Start, ex.Start, exit.Start, t0, fork.Time)
	}
	if fork.Time > ex.Time || ex.Time > exit.Time {
		t.Errorf("event times out of order: fork %d, exec %d, exit %d", fork.Time, ex.Time, exit.Time)
	}

	// A process of 8 threads: one fork, one exit, no thread events.
	py := exec.Command("python3", "-c", "import threading\nts=[threading.Thread(target=lambda: None) for _ in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]")
	if err := py.Run(); err != nil {
		t.Fatal(err)
	}
	tp := py.Process.Pid
	var forks, exits, threads int
	waitEvents(get, func(evs []Event) bool {
		forks, exits, threads = 0, 0, 0
		for _, e := range evs {
			if e.Tgid != tp {
				continue
			}
			switch {
			case e.Pid != tp:
				threads++
			case e.Kind == Fork:
				forks++
			case e.Kind == Exit:
				exits++
			}
		}
		return exits > 0
	})
	if forks != 1 || exits != 1 || threads != 0 {
		t.Errorf("a process of 9 threads: %d forks, %d exits, %d thread events; want 1, 1, 0", forks, exits, threads)
	}
	if l := lat(); len(l) > 0 {
		t.Logf("from event to Read, %d events (all of the host's): median %v, 99th percentile %v, max %v; %d lost",
			len(l), l[len(l)/2], l[len(l)*99/100], l[len(l)-1], w.Lost())
	}
}

// TestBPFDropsCounted: with a ring of one page (~64 events) not read while
// 40 children fork, exec and exit (120 events of theirs), the events that
// did not fit are counted: Read reports ErrOverrun first, and the
// children's events delivered plus the drops cover all 120.
func TestBPFDropsCounted(t *testing.T) {
	testprog.RequireRoot(t)
	src, err := openBPF(uint32(os.Getpagesize()), defaultWake)
	if err != nil {
		t.Fatal(err)
	}
	w := &Watcher{src: src, kind: SourceBPF}
	defer w.Close()
	const n = 40
	pids := map[int]bool{}
	for i := 0; i < n; i++ {
		cmd := exec.Command("/bin/true")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		pids[cmd.Process.Pid] = true
	}
	lost := w.Lost()
	if lost == 0 {
		t.Fatalf("no drops counted after %d events into a ring of %d bytes", 3*n, os.Getpagesize())
	}
	if _, err := w.Read(); !errors.Is(err, ErrOverrun) {
		t.Fatalf("first Read after drops: %v, want ErrOverrun", err)
	}
	seen := 0
	for src.rd.AvailableBytes() > 0 {
		evs, err := w.Read()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs {
			if pids[e.Tgid] && (e.Kind == Fork || e.Kind == Exec || e.Kind == Exit) {
				seen++
			}
		}
	}
	t.Logf("%d children: %d of their %d events delivered, %d events dropped (counted)", n, seen, 3*n, w.Lost())
	if seen >= 3*n {
		t.Errorf("all %d events delivered through a ring of %d bytes", seen, os.Getpagesize())
	}
	if uint64(seen)+w.Lost() < 3*n {
		t.Errorf("%d delivered + %d counted as dropped < the %d events of the children: drops went uncounted", seen, w.Lost(), 3*n)
	}
}

// TestBPFLongCgroupPath: a cgroup path longer than PathMax arrives cut to
// its first PathMax bytes (the agent then cannot tell what it is and looks).
func TestBPFLongCgroupPath(t *testing.T) {
	testprog.RequireRoot(t)
	w, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	if w.Source() != SourceBPF {
		t.Fatalf("Open used %s (BPF: %v), want the BPF source", w.Source(), w.BPFError())
	}
	get, stop, _ := collect(t, w)
	defer stop()
	rel := fmt.Sprintf("memprof-procwatch-long-%d", os.Getpid())
	for len(rel) <= PathMax+50 {
		rel += "/" + strings.Repeat("d", 60)
	}
	dir := kube.MkCgroup(t, v2Root, rel)
	id, err := cgroups.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	var e *Event
	waitEvents(get, func(evs []Event) bool {
		for i := range evs {
			if evs[i].Kind == CgroupMkdir && evs[i].Cgroup == id {
				e = &evs[i]
			}
		}
		return e != nil
	})
	if e == nil {
		t.Fatalf("no mkdir event for cgroup %d", id)
	}
	if want := ("/" + rel)[:PathMax]; e.Path != want {
		t.Errorf("path %q (%d bytes), want the first %d bytes of the path: %q", e.Path, len(e.Path), PathMax, want)
	}
}

// TestBPFBatchedWakeups: a tenant forks children that exit at once
// (testdata/fork_flood, 300 ms as fast as it can, in a v2 cgroup of its
// own). Their fork and exit events, sent mostly without a wakeup, are all
// delivered — exactly as many as the children it counted, none dropped —
// in far fewer Reads than events (when the flood is fast), and the last within the reader's timer
// period (defaultWake.batch) of the flood's end, plus 250 ms for the
// scheduling delays of a loaded 2-core host (on a quiet host the tail is
// the timer period). Then execs, 20 ms apart, each read within a few
// milliseconds (median under 4 ms: an exec left to the timer would wait
// about half its 10 ms period or more).
func TestBPFBatchedWakeups(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "fork_flood.c", "-O2")
	open := func() *Watcher {
		src, err := openBPF(0, defaultWake)
		if err != nil {
			t.Fatal(err)
		}
		return &Watcher{src: src, kind: SourceBPF}
	}
	r := runFlood(t, open(), bin, 300, 0, "")
	t.Logf("%v", r)
	if r.forks < 20 {
		t.Fatalf("fork_flood forked %d children in 300 ms, want at least 20", r.forks)
	}
	if r.forkEv != r.forks || r.exitEv != r.forks || r.lost != 0 {
		t.Errorf("%d children: %d fork and %d exit events delivered, %d dropped; want %d, %d, 0", r.forks, r.forkEv, r.exitEv, r.lost, r.forks, r.forks)
	}
	// Batching shows when the flood outruns the timer: at 1000 forks in
	// 300 ms, 2000 events in about 30 timer periods. (A loaded host can
	// slow the flood to less; the Reads count the host's other events.)
	if ev := r.forkEv + r.exitEv; r.forks < 1000 {
		t.Logf("batching not judged: %d forks, too few to outrun the timer", r.forks)
	} else if r.reads*4 > ev {
		t.Errorf("%d events read in %d Reads: not batched (want at most a quarter as many Reads)", ev, r.reads)
	}
	if limit := defaultWake.batch + 250*time.Millisecond; r.tail > limit {
		t.Errorf("the flood's last event read %v after its end, want within %v: events sent without a wakeup waited", r.tail, limit)
	}
	ex, _ := idleLatency(t, open(), 30, 20*time.Millisecond)
	t.Logf("exec events at idle: %v", ex)
	if len(ex) != 30 {
		t.Fatalf("%d exec events of 30 children read", len(ex))
	}
	if ex[len(ex)/2] > 4*time.Millisecond {
		t.Errorf("exec events read after a median %v, want under 4 ms", ex[len(ex)/2])
	}
}

// TestBPFCloseWhileReading: Close while a Read is draining the ring (a
// flood of fork_flood's events) ends the Read with an error, not a panic,
// 10 times over.
func TestBPFCloseWhileReading(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "fork_flood.c", "-O2")
	flood := exec.Command(bin, "3000", "0")
	stdin, _ := flood.StdinPipe()
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	defer flood.Wait()
	defer flood.Process.Kill()
	fmt.Fprintln(stdin, "go")
	for i := 0; i < 10; i++ {
		src, err := openBPF(0, defaultWake)
		if err != nil {
			t.Fatal(err)
		}
		w := &Watcher{src: src, kind: SourceBPF}
		done := make(chan error, 1)
		go func() {
			for {
				if _, err := w.Read(); err != nil && !errors.Is(err, ErrOverrun) {
					done <- err
					return
				}
			}
		}()
		time.Sleep(time.Duration(5+3*i) * time.Millisecond)
		w.Close()
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrClosed) {
				t.Errorf("Read after Close: %v, want os.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Read still blocked 5 s after Close")
		}
	}
}
