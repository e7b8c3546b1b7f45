package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/oom"
	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/recorder"
)

// OOMEntry is one OOM kill as /oom lists it.
type OOMEntry struct {
	Time      time.Time `json:"time"`
	Namespace string    `json:"namespace,omitempty"`
	Pod       string    `json:"pod,omitempty"`
	Container string    `json:"container,omitempty"`
	Node      string    `json:"node"`
	Pid       int       `json:"pid"`
	Comm      string    `json:"comm"`
	// Profiled: the victim was being profiled, so Profile holds its heap
	// at the kill; otherwise this is an OOM event with the report only.
	Profiled bool   `json:"profiled"`
	Kind     string `json:"kind,omitempty"`
	Profile  string `json:"profile,omitempty"`
	// RSSProfile is the victim's RSS post-mortem (rss_space by stack at
	// the kill, any language; the RSS tier follows every container),
	// empty when the victim was in no followed container.
	RSSProfile string      `json:"rssProfile,omitempty"`
	Report     string      `json:"report,omitempty"`
	Text       string      `json:"text,omitempty"`
	Details    *oom.Report `json:"details,omitempty"`
	Error      string      `json:"error,omitempty"`
}

// onOOM runs for every OOM kill on the node (the recorder reports all): it
// names the victim's container, writes the post-mortem (heap profile of a
// profiled victim, report), lists the kill in /oom and keeps the newest
// MaxOOMEntries on disk.
func (a *Agent) onOOM(k *recorder.OOMKill) {
	e := OOMEntry{Time: k.Victim.Time, Node: a.cfg.NodeName, Pid: k.Victim.Pid, Comm: k.Victim.Comm, Profiled: k.Target}
	c := a.victimContainer(k)
	if c != nil {
		e.Namespace, e.Pod, e.Container = c.labels.Namespace, c.labels.Pod, c.labels.Container
		if k.Profile != nil {
			for i := range k.Profile.Samples {
				l := k.Profile.Samples[i].Labels
				l["namespace"], l["pod"], l["container"] = e.Namespace, e.Pod, e.Container
				l["node"] = a.cfg.NodeName
			}
		}
	}
	paths, err := recorder.WriteOOM(k, a.oomDir())
	if err != nil {
		e.Error = err.Error()
	}
	e.setPaths(paths)
	attrs := []any{"pid", e.Pid, "comm", e.Comm, "namespace", e.Namespace, "pod", e.Pod, "container", e.Container, "profiled", k.Target, "files", paths}
	if err != nil {
		attrs = append(attrs, "err", err)
	}
	if k.Target {
		a.cfg.Log.Warn("OOM kill of a profiled process: post-mortem written", attrs...)
	} else {
		a.cfg.Log.Warn("OOM kill: report written", attrs...)
	}
	a.removeOOMFiles(a.addOOM(e, c))
}

// victimContainer is the container of an OOM kill's victim: a known one by
// its memory cgroup (v1 id, or v2 id) or else by pid; or, for a container
// started (and killed) since the last discovery, one found by discovering
// now, while its cgroup still exists. nil if none.
func (a *Agent) victimContainer(k *recorder.OOMKill) *container {
	a.mu.Lock()
	var c *container
	for _, kc := range a.known {
		if (k.Victim.MemcgID != 0 && kc.memcg == k.Victim.MemcgID) || (k.Victim.CgroupID > 1 && kc.cgv2 == k.Victim.CgroupID) {
			c = kc
			break
		}
	}
	if c == nil {
		for _, kc := range a.known {
			for _, p := range kc.c.Pids {
				if p == k.Victim.Pid {
					c = kc
				}
			}
		}
	}
	a.mu.Unlock()
	if c == nil {
		c = a.lookupNow(k)
	}
	return c
}

// setPaths files the post-mortem's paths (as recorder.WriteOOM returns
// them) in the entry, with the report's kind.
func (e *OOMEntry) setPaths(paths []string) {
	for _, p := range paths {
		switch {
		case strings.HasSuffix(p, ".pb.gz"):
			e.Profile = p
		case strings.HasSuffix(p, ".json"):
			e.Report = p
			if r, err := oom.ReadJSON(p); err == nil {
				e.Details = r
				e.Kind = r.Kind
			}
		case strings.HasSuffix(p, ".txt"):
			e.Text = p
		}
	}
}

// addOOM lists the kill e of a victim in container c (nil: none): its RSS
// post-mortem linked if it came first, its entry written, the counters
// counted. It returns the oldest entries beyond MaxOOMEntries, no longer
// listed.
func (a *Agent) addOOM(e OOMEntry, c *container) (dropped []OOMEntry) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// the RSS session's post-mortem of the same kill, if it came first
	e.RSSProfile = a.takeRSSOOM(e.Pid, e.Time)
	// The entry itself, so /oom lists it with its labels after a restart
	// (written under a.mu: linkRSSOOM rewrites it once it is listed).
	a.writeEntry(&e)
	a.oomTotal[e.Profiled]++
	if c != nil {
		a.oomKills[c.labels]++
		if _, known := a.known[c.c.ID]; !known {
			a.gone[c.labels] = time.Now() // counter kept an hour like the others
		}
	}
	a.ooms = append(a.ooms, e)
	if n := len(a.ooms) - a.cfg.MaxOOMEntries; n > 0 {
		dropped = append(dropped, a.ooms[:n]...)
		a.ooms = append([]OOMEntry(nil), a.ooms[n:]...)
	}
	return dropped
}

// removeOOMFiles deletes the files of OOM entries no longer listed, so the
// disk is bounded too.
func (a *Agent) removeOOMFiles(dropped []OOMEntry) {
	for _, d := range dropped {
		for _, p := range []string{d.Profile, d.RSSProfile, d.Report, d.Text} {
			if p != "" {
				os.Remove(p)
			}
		}
		if d.Report != "" {
			os.Remove(strings.TrimSuffix(d.Report, ".json") + entrySuffix)
		}
	}
}

func (a *Agent) oomDir() string { return filepath.Join(a.cfg.DataDir, "oom") }

// writeEntry writes e next to its report (nothing without a report), so
// /oom lists it with its labels after a restart.
func (a *Agent) writeEntry(e *OOMEntry) {
	if e.Report == "" {
		return
	}
	path := strings.TrimSuffix(e.Report, ".json") + entrySuffix
	b, err := json.MarshalIndent(e, "", "  ")
	if err == nil {
		err = writeAtomic(path, b)
	}
	if err != nil {
		a.cfg.Log.Error("keep OOM entry (not listed after a restart)", "path", path, "err", err)
	}
}

// entrySuffix names the file holding an OOMEntry next to its report.
const entrySuffix = ".entry"

// loadOOMs reads the entries of earlier runs from the OOM directory, newest
// MaxOOMEntries kept.
func (a *Agent) loadOOMs() {
	files, _ := filepath.Glob(filepath.Join(a.oomDir(), "*"+entrySuffix))
	var es []OOMEntry
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var e OOMEntry
		if json.Unmarshal(b, &e) == nil {
			es = append(es, e)
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].Time.Before(es[j].Time) })
	if n := len(es) - a.cfg.MaxOOMEntries; n > 0 {
		es = es[n:]
	}
	a.ooms = es
}

// OOMs lists the OOM kills seen, oldest first.
func (a *Agent) OOMs() []OOMEntry {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]OOMEntry{}, a.ooms...)
}

// lookupNow discovers the node's containers and returns the victim's.
func (a *Agent) lookupNow(k *recorder.OOMKill) *container {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	all, err := podfind.Discover(ctx, a.cfg.Paths)
	if err != nil && !errors.Is(err, podfind.ErrPartial) {
		return nil
	}
	for _, pc := range all {
		match := false
		if k.Victim.MemcgID != 0 && pc.CgroupV1Memory != "" {
			id, _ := cgroups.ID(pc.CgroupV1Memory)
			match = id == k.Victim.MemcgID
		}
		if !match && k.Victim.CgroupID > 1 && pc.CgroupV2 != "" {
			id, _ := cgroups.ID(pc.CgroupV2)
			match = id == k.Victim.CgroupID
		}
		for _, p := range pc.Pids {
			match = match || p == k.Victim.Pid
		}
		if match {
			return &container{c: pc, labels: labelSet{pc.Namespace, pc.Pod, pc.Name}}
		}
	}
	return nil
}
