package recorder

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/google/pprof/profile"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/oom"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/pprofout"
)

// OOMKill is one OOM kill seen by the session.
type OOMKill struct {
	Victim oom.Victim
	Target bool // the victim was being profiled
	// Profile is the victim's heap as it stood at the kill (nil when the
	// victim was not a target).
	Profile *pprofout.Profile
	// Allocator of the victim, for the fragmentation verdict.
	Allocator frag.Allocator
	// Coverage of the victim's heap ("complete: ..." or "partial: ..."),
	// and for partial coverage the bound on the bytes of blocks allocated
	// before the attach (see coverage.go).
	Coverage string
	Unseen   uint64
}

// startOOM attaches the OOM programs and starts reading their events.
func (s *Session) startOOM() error {
	if err := s.objs.AttachOOM(); err != nil {
		return err
	}
	rd, err := ringbuf.NewReader(s.objs.Events)
	if err != nil {
		return fmt.Errorf("open BPF ring buffer: %w", err)
	}
	s.events = rd
	s.oomStop = func() { rd.Close() }
	go func() {
		for {
			rec, err := rd.Read()
			if err != nil {
				if errors.Is(err, ringbuf.ErrClosed) {
					return
				}
				s.recordErr(fmt.Errorf("read BPF events: %w", err))
				continue
			}
			if len(rec.RawSample) < 4 {
				continue
			}
			if binary.LittleEndian.Uint32(rec.RawSample) == uint32(mbpf.MemprofEventTypeEV_STACK) {
				if s.dwarf != nil {
					if err := s.dwarf.handle(rec.RawSample); err != nil {
						s.recordErr(err)
					}
				}
				continue
			}
			var ev mbpf.MemprofOomEvent
			if err := binary.Read(bytes.NewReader(rec.RawSample), binary.LittleEndian, &ev); err != nil {
				s.recordErr(fmt.Errorf("decode OOM event: %w", err))
				continue
			}
			s.handleOOM(ev)
		}
	}()
	return nil
}

func (s *Session) handleOOM(ev mbpf.MemprofOomEvent) {
	pid := int(ev.Pid)
	v := oom.Victim{Time: time.Now(), Pid: pid, MemcgID: ev.Memcg, CgroupID: ev.Cgroup, Comm: cString(ev.Comm[:])}
	if ev.HaveRss != 0 {
		// The tracepoint reports RSS in KiB.
		v.AnonRSS, v.FileRSS, v.ShmemRSS = ev.AnonRss*1024, ev.FileRss*1024, ev.ShmemRss*1024
	}
	if ev.HaveScore != 0 {
		v.OOMScoreAdj = int(ev.OomScoreAdj)
	}
	s.mu.Lock()
	t := s.procs[pid]
	s.mu.Unlock()
	if v.MemcgID == 0 {
		// The classic tracepoint names only the pid, and the victim's
		// /proc entry no longer tells its cgroup once it is exiting: use
		// the cgroup a target was seen in, else the memory cgroup whose
		// charge triggered the OOM (for a cgroup-limit OOM, the limited
		// cgroup or one below it).
		if t != nil && t.cgroup != "" {
			if id, err := cgroups.ID(cgroupDir(t.cgroup)); err == nil {
				v.MemcgID = id
			}
		}
		if v.MemcgID == 0 {
			v.MemcgID = ev.TriggerMemcg
		}
	}
	if v.Comm == "" {
		if t != nil {
			v.Comm = t.comm
		} else {
			v.Comm = procmaps.Comm(pid)
		}
	}
	kill := &OOMKill{Victim: v, Allocator: frag.Unknown}
	victimProfile := func(k *keptTarget) {
		p := s.newProfile()
		for _, smp := range k.samples {
			smp.Labels = copyLabels(smp.Labels)
			p.Samples = append(p.Samples, smp)
		}
		p.Start = v.Time
		p.Duration = 0
		p.Comments = append(p.Comments, "memprof: heap of OOM victim "+strconv.Itoa(pid)+" ("+v.Comm+") at the kill")
		kill.Profile = p
		kill.Target = true
		kill.Allocator = k.allocator
		kill.Coverage = k.cov.describe()
		if !k.cov.complete {
			kill.Unseen = k.cov.preAttach
		}
	}
	if t != nil && !t.skipped {
		kill.Target = true
		kill.Allocator = t.allocator
		kill.Coverage = t.cov.describe()
		if !t.cov.complete {
			kill.Unseen = t.cov.preAttach
		}
		// Called on the event reader: it cannot wait for itself to drain
		// the ring buffer.
		s.exit(pid, "was OOM-killed", true, victimProfile)
	}
	if kill.Profile == nil {
		// Its exit was handled first (the kill is fast, the process events
		// may beat this reader): its kept state is the heap at the kill.
		if k := s.recentlyKept(pid, oomExitWindow); k != nil {
			victimProfile(k)
		}
	}
	if !kill.Target && !s.opts.AllOOMs {
		return
	}
	if s.opts.OOM != nil {
		s.opts.OOM(kill)
	}
}

// oomExitWindow is how long before an OOM kill's event the victim's exit
// may have been handled.
const oomExitWindow = 10 * time.Second

func cString(b []int8) string {
	var out []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

// WriteOOM writes the post-mortem of a kill into dir: the victim's heap
// profile (oom-<time>-<comm>-<pid>.pb.gz) when it was a target, and the
// report as .json and .txt. It returns the paths written.
func WriteOOM(k *OOMKill, dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create OOM directory %s: %w", dir, err)
	}
	r := oom.New(k.Victim)
	base := oom.FileBase(k.Victim.Time, k.Victim.Comm, k.Victim.Pid)
	var written []string
	if k.Profile != nil {
		if r.CgroupPath != "" {
			for i := range k.Profile.Samples {
				k.Profile.Samples[i].Labels["cgroup"] = r.CgroupPath
			}
		}
		built, err := pprofout.Build(k.Profile)
		if err != nil {
			return nil, fmt.Errorf("build OOM profile: %w", err)
		}
		live := inuseBytes(built)
		// The whole anonymous RSS (stacks and the program's own mappings
		// included: the victim's smaps is being torn down), bounded by
		// what the recording may have missed.
		v := frag.Bounded(k.Allocator, k.Victim.AnonRSS, uint64(live), k.Unseen, nil, "the recording did not see the victim start")
		r.Fragmentation = &v
		if k.Coverage != "" {
			r.Notes = append(r.Notes, "heap coverage: "+k.Coverage)
			k.Profile.Comments = append(k.Profile.Comments, pprofout.MetaComment("coverage", k.Coverage))
		}
		k.Profile.Comments = append(k.Profile.Comments, fragComments(v)...)
		path := filepath.Join(dir, base+".pb.gz")
		if err := pprofout.WriteFile(path, k.Profile); err != nil {
			return nil, err
		}
		r.ProfilePath = path
		written = append(written, path)
		if rows, err := pprofout.Top(built, "inuse_space", 10); err == nil {
			r.TopStacks = rows
		}
	} else {
		r.Notes = append(r.Notes, "the victim was not being profiled: no heap profile")
	}
	j, t, err := r.WriteFiles(dir, base)
	if err != nil {
		return written, err
	}
	return append(written, j, t), nil
}

// inuseBytes sums the inuse_space values of a built profile.
func inuseBytes(p *profile.Profile) int64 {
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			idx = i
		}
	}
	if idx < 0 {
		return 0
	}
	var sum int64
	for _, smp := range p.Sample {
		sum += smp.Value[idx]
	}
	return sum
}

// fragComments records a verdict's figures in profile comments.
func fragComments(v frag.Verdict) []string {
	return []string{
		pprofout.MetaComment("allocator", string(v.Allocator)),
		pprofout.MetaComment("rss_anon", strconv.FormatUint(v.RSS, 10)),
		pprofout.MetaComment("live_estimate", strconv.FormatUint(v.Live, 10)),
		pprofout.MetaComment("frag_ratio", strconv.FormatFloat(v.Ratio, 'f', 3, 64)),
		pprofout.MetaComment("frag_excess", strconv.FormatInt(v.Excess, 10)),
		pprofout.MetaComment("frag_verdict", v.Summary),
	}
}
