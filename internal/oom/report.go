// Package oom writes the OOM flight recorder's post-mortem: when the kernel
// picks an OOM victim (oom:mark_victim), memprof resolves the victim's
// memory cgroup, reads its counters, decides whether a cgroup limit or the
// whole host ran out of memory, and writes a JSON and a text report next to
// the heap profile taken at that moment.
package oom

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/pprofout"
)

// Kinds of OOM kill.
const (
	KindCgroupLimit = "cgroup-limit" // a memory cgroup (the victim's or an ancestor's) hit its limit
	KindHost        = "host"         // the host (or NUMA node) ran out of memory
)

// NearLimit is the fraction of a cgroup's limit at which its usage counts as
// "at the limit" for Classify.
const NearLimit = 0.9

// Report is the post-mortem of one OOM kill. Byte counts are bytes.
type Report struct {
	Time          time.Time
	Pid           int
	Comm          string
	Kind          string         // KindCgroupLimit or KindHost
	CgroupPath    string         // victim's memory cgroup directory, "" if unknown
	CgroupVersion int            // 1 or 2, 0 if unknown
	Limit, Usage  uint64         // of the limiting cgroup (the victim's, or the ancestor whose limit applied)
	Stats         *cgroups.Stats `json:",omitempty"`
	// Victim's resident memory when it was chosen (from the tracepoint).
	AnonRSS, FileRSS, ShmemRSS uint64
	OOMScoreAdj                int
	TopStacks                  []pprofout.StackRow `json:",omitempty"` // top live (inuse_space) stacks of the victim
	Fragmentation              *frag.Verdict       `json:",omitempty"`
	ProfilePath                string              `json:",omitempty"` // heap profile written at the kill
	Notes                      []string            `json:",omitempty"`
}

// Classify tells whether an OOM kill in the cgroup described by stats was
// caused by a cgroup limit: the cgroup, or its nearest limited ancestor
// (stats.Ancestor), has a limit and either its usage or peak usage is within
// NearLimit of it or its oom_kill or failcnt counters are non-zero. Otherwise, or when
// stats is nil, the host ran out of memory. The counters are cumulative:
// callers that saw earlier kills should compare against the earlier stats.
func Classify(stats *cgroups.Stats) string {
	if _, ok := limiting(stats); ok {
		return KindCgroupLimit
	}
	return KindHost
}

// limiting returns the cgroup whose limit explains the OOM, if any: the
// first limited cgroup, from the victim's up, at or near its limit (now or at
// its peak) or with failed charges or kills recorded. v1 records oom_kill on
// the victim's own memcg even when an ancestor's limit applied, so a kill
// recorded there also counts for the ancestor.
func limiting(stats *cgroups.Stats) (*cgroups.Stats, bool) {
	for s := stats; s != nil; s = s.Ancestor {
		if s.Limit == 0 {
			continue
		}
		near := NearLimit * float64(s.Limit)
		if s.OOMKills > 0 || stats.OOMKills > 0 || s.Failcnt > 0 || float64(s.Usage) >= near || float64(s.MaxUsage) >= near {
			return s, true
		}
	}
	return nil, false
}

// Victim is what the BPF side reports at oom:mark_victim, converted to bytes.
type Victim struct {
	Time     time.Time
	Pid      int
	Comm     string
	MemcgID  uint64 // v1 memory cgroup id (kernfs id = inode of its directory); on pure v2 the v2 id
	CgroupID uint64 // v2 cgroup id, 1 (root) for a process that lives only in a v1 memcg
	AnonRSS  uint64 // bytes (the tracepoint gives KiB: multiply by 1024)
	FileRSS  uint64
	ShmemRSS uint64
	// OOMScoreAdj of the victim.
	OOMScoreAdj int
}

// New builds the report of a victim: it finds the victim's memory cgroup by
// id (falling back to /proc/PID/cgroup while the process still exists), reads
// its statistics and classifies the kill. Whatever cannot be found is
// explained in Notes; New never fails. The caller adds TopStacks,
// Fragmentation and ProfilePath.
func New(v Victim) *Report {
	r := &Report{
		Time: v.Time, Pid: v.Pid, Comm: v.Comm,
		AnonRSS: v.AnonRSS, FileRSS: v.FileRSS, ShmemRSS: v.ShmemRSS,
		OOMScoreAdj: v.OOMScoreAdj,
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	v1root, v2root := cgroups.Root()
	var dir string
	var notes []string
	try := func(root string, id uint64, what string) {
		if dir != "" || root == "" || id == 0 || (id == 1 && root == v2root) {
			return
		}
		p, err := cgroups.PathByID(root, id)
		if err != nil {
			notes = append(notes, fmt.Sprintf("%s id %d: %v", what, id, err))
			return
		}
		if _, err := os.Stat(filepath.Join(p, "memory.stat")); err != nil {
			return // a v2 cgroup without the memory controller
		}
		dir = p
	}
	// Inode numbers of the v1 and v2 trees are unrelated: a v1 memcg id is
	// only looked up in the v2 tree on pure v2 hosts.
	if v1root != "" {
		try(v1root, v.MemcgID, "memory cgroup")
	} else {
		try(v2root, v.MemcgID, "memory cgroup")
	}
	try(v2root, v.CgroupID, "v2 cgroup")
	if dir == "" && v.Pid > 0 {
		if m1, m2, err := cgroups.OfProcess(v.Pid); err == nil {
			if v1root != "" && m1 != "" {
				dir = filepath.Join(v1root, m1)
			} else if v2root != "" && m2 != "" {
				dir = filepath.Join(v2root, m2)
			}
		}
	}
	if dir == "" {
		r.Notes = append(notes, "the victim's memory cgroup was not found (removed with its container before it could be read?): kind guessed as host")
		r.Kind = KindHost
		return r
	}
	r.CgroupPath = dir
	st, err := cgroups.ReadStats(dir)
	if err != nil {
		r.Notes = append(r.Notes, fmt.Sprintf("cgroup statistics unavailable: %v", err))
		r.Kind = KindHost
		return r
	}
	r.Stats = st
	r.CgroupVersion = st.Version
	r.Kind = Classify(st)
	r.Limit, r.Usage = st.Limit, st.Usage
	if l, ok := limiting(st); ok {
		r.Limit, r.Usage = l.Limit, l.Usage
		if l != st {
			r.Notes = append(r.Notes, fmt.Sprintf("the limit that applied is the ancestor's %s (%s)", l.Path, pprofout.HumanBytes(int64(l.Limit))))
		}
	}
	return r
}

// FileBase is the file name stem of a report: oom-<UTC time>-<comm>-<pid>,
// e.g. oom-20261122T223000-leaker-1234, with comm reduced to [A-Za-z0-9._-].
func FileBase(t time.Time, comm string, pid int) string {
	var b strings.Builder
	for _, c := range comm {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('_')
		}
	}
	s := strings.Trim(b.String(), ".")
	if s == "" {
		s = "unknown"
	}
	if len(s) > 32 {
		s = s[:32]
	}
	return fmt.Sprintf("oom-%s-%s-%d", t.UTC().Format("20060102T150405"), s, pid)
}

// WriteFiles writes the report as dir/base.json and dir/base.txt, each
// atomically (temporary file, fsync, rename), creating dir if needed.
func (r *Report) WriteFiles(dir, base string) (jsonPath, textPath string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", fmt.Errorf("create OOM report directory %s: %w (choose a writable directory)", dir, err)
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", "", fmt.Errorf("encode OOM report of pid %d: %w", r.Pid, err)
	}
	jsonPath = filepath.Join(dir, base+".json")
	textPath = filepath.Join(dir, base+".txt")
	if err := writeAtomic(jsonPath, append(js, '\n')); err != nil {
		return "", "", err
	}
	if err := writeAtomic(textPath, []byte(r.Text())); err != nil {
		return "", "", err
	}
	return jsonPath, textPath, nil
}

func writeAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w (is the directory writable and not full?)", path, err)
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w (is the disk full?)", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: rename: %w", path, err)
	}
	return nil
}

// ReadJSON reads a report written by WriteFiles.
func ReadJSON(path string) (*Report, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read OOM report %s: %w", path, err)
	}
	var r Report
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("parse OOM report %s: %w (not a memprof OOM report JSON file?)", path, err)
	}
	return &r, nil
}

// Text renders the report for people, with binary byte units.
func (r *Report) Text() string {
	hb := func(v uint64) string { return pprofout.HumanBytes(int64(v)) }
	var b strings.Builder
	fmt.Fprintf(&b, "OOM kill of %s (pid %d) at %s\n", r.Comm, r.Pid, r.Time.UTC().Format(time.RFC3339))
	switch r.Kind {
	case KindCgroupLimit:
		fmt.Fprintf(&b, "Cause:    cgroup-limit: the memory cgroup limit was reached (raise the limit or fix the growth; the host had memory)\n")
	case KindHost:
		fmt.Fprintf(&b, "Cause:    host: the machine ran out of memory, not a cgroup limit (look at every large process on the host)\n")
	default:
		fmt.Fprintf(&b, "Cause:    %s\n", r.Kind)
	}
	if r.CgroupPath != "" {
		fmt.Fprintf(&b, "Cgroup:   %s (v%d)\n", r.CgroupPath, r.CgroupVersion)
	}
	if r.Limit > 0 {
		fmt.Fprintf(&b, "Limit:    %s, usage after the kill %s (%.1f%%)\n", hb(r.Limit), hb(r.Usage), 100*float64(r.Usage)/float64(r.Limit))
		if r.Stats != nil && r.Stats.Limit == r.Limit && r.Stats.MaxUsage > 0 {
			fmt.Fprintf(&b, "Peak:     %s (%.1f%% of the limit)\n", hb(r.Stats.MaxUsage), 100*float64(r.Stats.MaxUsage)/float64(r.Limit))
		}
	} else if r.Stats != nil {
		fmt.Fprintf(&b, "Limit:    none, usage %s\n", hb(r.Usage))
	}
	if s := r.Stats; s != nil {
		fmt.Fprintf(&b, "Memory:   anon %s, file %s (shmem %s), kernel %s, sock %s, working set %s\n",
			hb(s.Anon), hb(s.File), hb(s.Shmem), hb(s.Kernel), hb(s.Sock), hb(s.WorkingSet))
		fmt.Fprintf(&b, "Counters: oom_kill %d, failcnt %d\n", s.OOMKills, s.Failcnt)
	}
	fmt.Fprintf(&b, "Victim:   anon-rss %s, file-rss %s, shmem-rss %s, oom_score_adj %d\n",
		hb(r.AnonRSS), hb(r.FileRSS), hb(r.ShmemRSS), r.OOMScoreAdj)
	if len(r.TopStacks) > 0 {
		b.WriteString("\nTop live allocation stacks:\n")
		_ = pprofout.FormatTop(&b, r.TopStacks, "inuse_space", 8)
	}
	if f := r.Fragmentation; f != nil {
		fmt.Fprintf(&b, "\nFragmentation (%s): %s\n", f.Allocator, f.Summary)
		for _, a := range f.Advice {
			fmt.Fprintf(&b, "  - %s\n", a)
		}
	}
	if r.ProfilePath != "" {
		fmt.Fprintf(&b, "\nHeap profile: %s (go tool pprof -sample_index=inuse_space %s)\n", r.ProfilePath, r.ProfilePath)
	}
	if len(r.Notes) > 0 {
		b.WriteString("\nNotes:\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "  - %s\n", n)
		}
	}
	return b.String()
}
