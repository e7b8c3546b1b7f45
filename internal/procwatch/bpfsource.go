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

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	mbpf "github.com/memprof/memprof/bpf"
)

// maxBatch bounds the events one Read returns (the rest wait for the next).
const maxBatch = 1024

type bpfSource struct {
	objs  mbpf.ProceventsObjects
	links []link.Link
	rd    *ringbuf.Reader
	rec   ringbuf.Record

	mu       sync.Mutex
	reported uint64 // drops already returned as ErrOverrun
}

// openBPF loads and attaches the programs; ringBytes sizes the ring buffer
// (a power of two of at least a page; 0: the object's 256 KiB).
func openBPF(ringBytes uint32) (_ *bpfSource, err error) {
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
	s := &bpfSource{}
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
	for len(out) < maxBatch {
		if len(out) > 0 && s.rd.AvailableBytes() == 0 {
			break
		}
		if err := s.rd.ReadInto(&s.rec); err != nil {
			if len(out) > 0 {
				break
			}
			return nil, err
		}
		if e, ok := decode(s.rec.RawSample); ok {
			out = append(out, e)
		}
	}
	return out, nil
}

func (s *bpfSource) reportedDrops() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reported
}

// decode turns one ring record into an Event (false: not one of ours).
func decode(b []byte) (Event, bool) {
	var r mbpf.ProceventsPwEvent
	if len(b) < binary.Size(r) {
		return Event{}, false
	}
	if err := binary.Read(bytes.NewReader(b), binary.NativeEndian, &r); err != nil {
		return Event{}, false
	}
	e := Event{
		Path: cgroupPath(b[binary.Size(r):]),
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
		err = s.rd.Close()
	}
	for _, l := range s.links {
		l.Close()
	}
	s.objs.Close()
	return err
}
