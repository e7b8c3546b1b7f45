package rss

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"time"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/pprofout"
)

// OOMKill is one OOM kill with the victim's RSS profile at the kill.
type OOMKill struct {
	Pid     int
	Comm    string
	Memcg   string // the victim's memory cgroup directory ("" if unknown)
	AnonRSS int64  // bytes, from the victim's mm at the kill
	Target  bool   // the victim was a target
	Time    time.Time
	Profile *pprofout.RSSProfile // nil when the victim was not a target
	Summary []ProcSummary
}

// handleOOM builds the victim's post-mortem at once: its memory is still
// mapped until the kill completes (or the OOM reaper unmaps it).
func (s *Session) handleOOM(raw []byte) {
	var ev mbpf.RssRssOomEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &ev); err != nil {
		s.mu.Lock()
		s.recordErr(fmt.Errorf("short OOM event (%d bytes): %w", len(raw), err))
		s.mu.Unlock()
		return
	}
	pid, memcg := int(ev.Pid), ev.Memcg
	k := &OOMKill{Pid: pid, AnonRSS: int64(ev.AnonRss) << 10, Time: time.Now()}
	comm := make([]byte, 0, len(ev.Comm))
	for _, c := range ev.Comm {
		if c == 0 {
			break
		}
		comm = append(comm, byte(c))
	}
	k.Comm = string(comm)
	s.mu.Lock()
	_, known := s.procs[pid]
	dir, inCg := s.cgIDs[memcg]
	s.ooms++
	s.mu.Unlock()
	v1, v2 := cgroups.Root()
	if inCg && (v1 != "" && isUnder(dir, v1) || v1 == "" && v2 != "") {
		k.Memcg = dir // a followed memory cgroup: no walk of the hierarchy for its path
	} else if v1 != "" && memcg != 0 {
		if p, err := cgroups.PathByID(v1, memcg); err == nil {
			k.Memcg = p
		}
	}
	var pidTarget uint8
	k.Target = known || inCg || s.objs.RssPids.Lookup(uint32(pid), &pidTarget) == nil
	if !k.Target && !s.opts.AllOOMs {
		return
	}
	if k.Target {
		p, sums, err := s.profile(func(p uint32) bool { return p == uint32(pid) }, false)
		if err == nil {
			p.Comments = append(p.Comments, pprofout.MetaComment("oom_victim", fmt.Sprint(pid)),
				pprofout.MetaComment("rss_residency", "as of the last pagemap check (the kill tears the memory down)"),
				pprofout.MetaComment("oom_anon_rss", fmt.Sprint(k.AnonRSS)))
			if k.Memcg != "" {
				p.Comments = append(p.Comments, pprofout.MetaComment("oom_memcg", k.Memcg))
			}
			k.Profile, k.Summary = p, sums
		}
	}
	s.opts.Notify(fmt.Sprintf("OOM kill of pid %d (%s)", pid, k.Comm))
	if s.opts.OOM != nil {
		s.opts.OOM(k)
	}
}

// WriteOOM writes k's post-mortem RSS profile to dir as
// oom-<time>-<comm>-<pid>.rss.pb.gz and returns its path.
func WriteOOM(k *OOMKill, dir string) (string, error) {
	if k.Profile == nil {
		return "", fmt.Errorf("pid %d was not a target: no RSS profile", k.Pid)
	}
	path := filepath.Join(dir, fmt.Sprintf("oom-%s-%s-%d.rss.pb.gz", k.Time.Format("20060102-150405"), sanitize(k.Comm), k.Pid))
	return path, pprofout.WriteRSSFile(path, k.Profile)
}

func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if (c < 'a' || c > 'z') && (c < 'A' || c > 'Z') && (c < '0' || c > '9') && c != '-' && c != '_' && c != '.' {
			b[i] = '_'
		}
	}
	return string(b)
}
