// The BPF source: bpf/procevents.bpf.c on BTF tracepoints, its events read
// from a ring buffer and decoded into the type bpf2go generates from
// procevents.h.

package procwatch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	mbpf "github.com/memprof/memprof/bpf"
)

// maxBatch bounds the events one Read returns (the rest wait for the next).
const maxBatch = 1024

// wakePolicy is when the BPF programs wake the reader (the wake_* constants
// of procevents.bpf.c): bulk events (fork, exit) at most once per batch;
// the events discovery and the recorder's attach wait for (exec, cgroup
// mkdir, rmdir, attach) at most once per prompt (0: each one); any event
// once the ring holds 1/ringFraction of its size unread. Events sent
// without a wakeup are read by the reader's timer, batch after each read
// that returned records. batch 0: every event wakes the reader as the
// kernel decides by default (when the reader has read all before it), and
// there is no timer: the behaviour before batching, kept for the
// benchmark's comparison.
type wakePolicy struct {
	batch, prompt time.Duration
	ringFraction  uint32 // the ring's size / this: the unread bytes that force a wakeup
}

// defaultWake: each wakeup costs the reader about 11 µs of CPU
// (BenchmarkForkFlood, eager), so a fork+exit flood wakes it about 100
// times a second however fast it runs (its events read within about 10 ms:
// a forked child's attach waits that much more), while each exec or cgroup
// event still wakes it at once (discovery and the attach of a container's
// first process follow them within milliseconds; rate-limiting them too,
// prompt > 0, bounds an exec flood as well but delays an exec that follows
// another within prompt by up to batch). A quarter of the ring (256 KiB:
// ~1000 events) is read long before it can fill.
var defaultWake = wakePolicy{batch: 10 * time.Millisecond, ringFraction: 4}

// eagerWake is the wakeup of every event (for comparisons).
var eagerWake = wakePolicy{}

// pastDeadline makes a ring read return at once when there is nothing to
// read (a non-zero time in the past).
var pastDeadline = time.Unix(0, 1)

type bpfSource struct {
	objs  mbpf.ProceventsObjects
	links []link.Link
	rd    *ringbuf.Reader
	rec   ringbuf.Record
	wake  wakePolicy
	// tick is when the ring must be read again though no wakeup came (the
	// events sent without one since the last read); zero: wait for a wakeup.
	tick time.Time

	mu       sync.Mutex
	reported uint64 // drops already returned as ErrOverrun
	closed   bool   // close began: rd's ring is gone or going
}

// available is the unread bytes of the ring; false once close began (the
// ring reader's AvailableBytes dereferences the ring its Close releases).
func (s *bpfSource) available() (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, false
	}
	return s.rd.AvailableBytes(), true
}

// openBPF loads and attaches the programs; ringBytes sizes the ring buffer
// (a power of two of at least a page; 0: the object's 256 KiB), wake is
// when the programs wake the reader.
func openBPF(ringBytes uint32, wake wakePolicy) (_ *bpfSource, err error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raise RLIMIT_MEMLOCK: %w", err)
	}
	spec, err := mbpf.LoadProcevents()
	if err != nil {
		return nil, fmt.Errorf("read the embedded process event BPF object: %w", err)
	}
	if ringBytes != 0 {
		spec.Maps[mbpf.ProceventsMapProcEvents].MaxEntries = ringBytes
	}
	size := spec.Maps[mbpf.ProceventsMapProcEvents].MaxEntries
	for name, v := range map[string]uint64{
		mbpf.ProceventsVarWakeBatchNs:  uint64(wake.batch.Nanoseconds()),
		mbpf.ProceventsVarWakePromptNs: uint64(wake.prompt.Nanoseconds()),
		mbpf.ProceventsVarWakeBytes:    uint64(size / max(1, wake.ringFraction)),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("set %s of the process event programs: %w", name, err)
		}
	}
	s := &bpfSource{wake: wake}
	if err := spec.LoadAndAssign(&s.objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			// %+v of the VerifierError is the whole log, not only its end.
			return nil, fmt.Errorf("the kernel's verifier rejected the process event programs: %w\n%s", err, fmt.Sprintf("%+v", ve))
		}
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("load the process event programs: %w: run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN", err)
		}
		return nil, fmt.Errorf("load the process event programs: %w", err)
	}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	p := &s.objs.ProceventsPrograms
	for _, prog := range []*ebpf.Program{p.PeFork, p.PeExec, p.PeExit, p.PeCgroupMkdir, p.PeCgroupRmdir, p.PeCgroupAttach} {
		l, err := link.AttachTracing(link.TracingOptions{Program: prog})
		if err != nil {
			return nil, fmt.Errorf("attach the process event program %s (BTF tracepoint): %w", prog, err)
		}
		s.links = append(s.links, l)
	}
	s.rd, err = ringbuf.NewReader(s.objs.ProcEvents)
	if err != nil {
		return nil, fmt.Errorf("process events ring buffer: %w", err)
	}
	return s, nil
}

// read returns the events in the ring (blocking until one comes), or
// ErrOverrun once when drops were counted since the last read.
func (s *bpfSource) read() ([]Event, error) {
	if d := s.lost(); d > s.reportedDrops() {
		s.mu.Lock()
		s.reported = d
		s.mu.Unlock()
		return nil, ErrOverrun
	}
	var out []Event
	got := false // records read (out has the ones decoded)
	for len(out) < maxBatch {
		avail, open := s.available()
		switch {
		case !open:
			if got {
				return s.batchRead(out), nil
			}
			return nil, fmt.Errorf("process events ring buffer: %w", os.ErrClosed)
		case avail > 0:
			// Records sent without a wakeup may be there: read them
			// without waiting for one.
			s.rd.SetDeadline(pastDeadline)
		case got:
			return s.batchRead(out), nil
		case s.tick.IsZero():
			s.rd.SetDeadline(time.Time{})
		default:
			// The ring reader's deadline is cut to whole milliseconds:
			// one more makes it return after the tick, never before.
			s.rd.SetDeadline(s.tick.Add(time.Millisecond))
		}
		err := s.rd.ReadInto(&s.rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The ring was empty as this returned.
			if got {
				return s.batchRead(out), nil
			}
			if !s.tick.IsZero() && !time.Now().Before(s.tick) {
				// Empty at least batch after the last records were
				// read: every event from now on wakes the reader
				// (procevents.bpf.c's wake_batch_ns has passed since
				// the last wakeup).
				s.tick = time.Time{}
			}
			continue
		}
		if err != nil {
			if got {
				break
			}
			return nil, err
		}
		got = true
		if e, ok := decode(s.rec.RawSample); ok {
			out = append(out, e)
		}
	}
	if !got {
		return out, nil
	}
	return s.batchRead(out), nil
}

// batchRead notes that records were read (out, the events decoded): the ring is read again
// wake.batch from now, wakeup or not.
//
// The programs are told (reader_due, CLOCK_BOOTTIME ns, taken before the
// tick's time so the tick is never earlier): bulk events until then need
// not wake the reader.
func (s *bpfSource) batchRead(out []Event) []Event {
	if s.wake.batch > 0 {
		due := bootNanos() + uint64(s.wake.batch.Nanoseconds())
		s.tick = time.Now().Add(s.wake.batch)
		// Should the write fail, bulk events wake the reader as
		// without it (every batch).
		_ = s.objs.ReaderDue.Set(due)
	}
	return out
}

// bootNanos is CLOCK_BOOTTIME in ns (the programs' bpf_ktime_get_boot_ns).
func bootNanos() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return uint64(ts.Nano())
}

func (s *bpfSource) reportedDrops() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reported
}

// decode turns one ring record into an Event (false: not one of ours).
func decode(b []byte) (Event, bool) {
	var r mbpf.ProceventsPwEvent
	n, err := binary.Decode(b, binary.NativeEndian, &r)
	if err != nil {
		return Event{}, false
	}
	e := Event{
		Path: cgroupPath(b[n:]),
		Pid:  int(r.Pid), Tgid: int(r.Tgid), Memcg: r.Memcg, Cgroup: r.Cgroup,
		Start: r.Start, Time: r.Ts, Level: int(r.Level),
	}
	switch mbpf.ProceventsPwEventKind(r.Kind) {
	case mbpf.ProceventsPwEventKindPE_FORK:
		e.Kind, e.ParentPid, e.ParentTgid = Fork, int(r.Ptid), int(r.Ppid)
	case mbpf.ProceventsPwEventKindPE_EXEC:
		e.Kind = Exec
	case mbpf.ProceventsPwEventKindPE_EXIT:
		e.Kind = Exit
	case mbpf.ProceventsPwEventKindPE_CGROUP_MKDIR:
		e.Kind = CgroupMkdir
	case mbpf.ProceventsPwEventKindPE_CGROUP_RMDIR:
		e.Kind = CgroupRmdir
	case mbpf.ProceventsPwEventKindPE_CGROUP_ATTACH:
		e.Kind = CgroupAttach
	default:
		return Event{}, false
	}
	return e, true
}

// cgroupPath is the path of a pw_cgroup_event after its pw_event (b is
// what follows it in the record: empty for process events).
func cgroupPath(b []byte) string {
	var ce mbpf.ProceventsPwCgroupEvent
	b = b[:min(len(b), len(ce.Path))]
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// lost sums the per-CPU drop counters.
func (s *bpfSource) lost() uint64 {
	var per []uint64
	if err := s.objs.ProcDrops.Lookup(uint32(0), &per); err != nil {
		return 0
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n
}

func (s *bpfSource) close() error {
	var err error
	if s.rd != nil {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		err = s.rd.Close()
	}
	for _, l := range s.links {
		l.Close()
	}
	s.objs.Close()
	return err
}
