package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/pprof/profile"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/memprof/memprof/internal/agent/pyroscope"
	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/internal/unwindtable"
	"github.com/memprof/memprof/pprofout"
)

// The agent's RSS tier: every container on the node (annotated or not, with
// no overhead budget: page-fault tracepoints cost the target next to
// nothing) gets periodic RSS profiles, per-container RSS metrics, and an
// RSS post-mortem when one of its processes is OOM-killed, whatever its
// language. The allocator probes stay for the selected containers.

// Metric names of the RSS tier.
const (
	MetricRSSSampled = "memprof_container_rss_profiled_bytes"
	MetricRSSBefore  = "memprof_container_rss_before_recording_bytes"
	MetricRSSFaulted = "memprof_container_rss_faulted_bytes"
	MetricRSSRegion  = "memprof_container_rss_region_bytes"
)

// The RSS session's rescans of every container cgroup (new processes
// noted, exited ones reclaimed) and its pagemap check of every sampled
// folio (what an OOM post-mortem's residency is as of; periodic and HTTP
// profiles check theirs when built): tens of seconds apart, so their cost
// does not grow with the containers at the rate of a poll. Discovery tells
// the session which cgroups have new processes (discover).
const (
	rssPoll   = 30 * time.Second
	rssVerify = 30 * time.Second
)

type rssTier struct {
	s       rssSession
	mu      sync.Mutex
	dirs    map[string]labelSet   // cgroup directories followed
	figures map[labelSet][3]int64 // profiled, before, faulted (last profile)
	regions map[labelSet]rss.Regions
	// oomPending: RSS post-mortems by victim pid, until /oom's entry of
	// the kill takes them (at most maxPendingRSSOOMs)
	oomPending map[int]rssOOMRef
	prof       sync.Mutex // one RSS profile built at a time (periodic, HTTP)
}

// startRSS starts the RSS session; without it (an old kernel) the agent
// runs with the allocator tier only, and says so.
func (a *Agent) startRSS(ctx context.Context) {
	if a.cfg.NoRSS {
		return
	}
	// The heap tier's unwind tables: one set per node for both tiers.
	var tables *unwindtable.Shared
	a.mu.Lock()
	if a.s != nil {
		tables = a.s.UnwindTables()
	}
	a.mu.Unlock()
	s, err := rss.Start(ctx, rss.Options{
		Unwind:     tables,
		SampleRate: a.cfg.SampleRate,
		// Every container of the node: BPF filters the faults by cgroup,
		// so the polls only note processes for the profiles' summaries
		// and reclaim exited ones (rssPoll); a profile checks the folios
		// it reports against pagemap when it is built.
		Poll:       rssPoll,
		Verify:     rssVerify,
		AllowEmpty: true,
		DropExited: true,
		AllOOMs:    true,
		Notify:     func(msg string) {},
		OOM:        a.onRSSOOM,
	})
	if err != nil {
		a.cfg.Log.Warn("RSS profiles disabled", "err", err)
		return
	}
	a.setRSS(s)
	a.cfg.Log.Info("RSS profiles of every container (page-fault tracepoints)", "oom_post_mortems", s.OOMSupported())
}

// setRSS makes s the agent's RSS tier and exports its metrics.
func (a *Agent) setRSS(s rssSession) {
	t := &rssTier{s: s, dirs: map[string]labelSet{}, figures: map[labelSet][3]int64{}, regions: map[labelSet]rss.Regions{}, oomPending: map[int]rssOOMRef{}}
	a.mu.Lock()
	a.rss = t
	a.mu.Unlock()
	a.reg.MustRegister(&rssCollector{a: a})
}

// rssTier is the RSS tier (nil: off, or not started yet).
func (a *Agent) rssTier() *rssTier {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.rss
}

func (a *Agent) stopRSS() {
	a.mu.Lock()
	t := a.rss
	a.mu.Unlock()
	if t != nil {
		t.s.Close()
	}
}

// rssSync follows the cgroup of every known pod container and stops
// following the ones gone. It runs after the heap tier has attached to new
// containers, so it never delays that.
func (a *Agent) rssSync() {
	a.mu.Lock()
	t := a.rss
	want := map[string]labelSet{}
	for _, c := range a.known {
		// Pod containers only (as the heap tier): a cgroup discovery
		// found without a pod has no name to file its profiles under.
		if c.dir != "" && c.labels.Namespace != "" && c.labels.Pod != "" {
			want[c.dir] = c.labels
		}
	}
	a.mu.Unlock()
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for dir, l := range want {
		if _, ok := t.dirs[dir]; ok {
			t.dirs[dir] = l
			continue
		}
		if err := t.s.AddCgroup(dir); err != nil {
			a.cfg.Log.Warn("RSS profiles of container", l.logAttrs("cgroup", dir, "err", err)...)
			continue
		}
		t.dirs[dir] = l
	}
	for dir, l := range t.dirs {
		if _, ok := want[dir]; !ok {
			t.s.RemoveCgroup(dir)
			delete(t.dirs, dir)
			delete(t.figures, l)
			delete(t.regions, l)
		}
	}
}

// rssPyroscopeTypes describes the RSS profile's sample types to Pyroscope,
// which knows only Go's. Pyroscope (1.x) names a pprof upload's profile type
// after its sample types, "memory" when one of them (or its display name)
// contains "inuse_" or "alloc_" (pkg/og/convert/pprof metricName): the
// display name of rss_space makes the RSS profile
// memory:rss_space:bytes:space:bytes (and memory:faulted_space:...) next
// to the heap profile's memory:inuse_space:bytes:space:bytes. Pyroscope
// 0.x, which ingests only the configured types, shows them as
// <app>.inuse_rss_space and <app>.faulted_space.
var rssPyroscopeTypes = map[string]pyroscope.SampleType{
	pprofout.RSSSpace:          {Units: "bytes", Aggregation: "average", DisplayName: "inuse_rss_space"},
	pprofout.RSSFaultedSpace:   {Units: "bytes", Aggregation: "sum"},
	pprofout.RSSFaultedObjects: {Units: "objects", Aggregation: "sum"},
}

// rssProfileOf builds the RSS profile of the processes in the cgroup
// directories dirs, each sample labelled with its container and node. A
// nil profile (and no error) means no process is in them.
func (a *Agent) rssProfileOf(t *rssTier, dirs map[string]labelSet) (*pprofout.RSSProfile, []rss.ProcSummary, error) {
	byPid := map[uint32]labelSet{}
	for dir, l := range dirs {
		pids, err := cgroups.Procs(dir, true)
		if err != nil {
			continue // gone since: its processes are not in the profile
		}
		for _, p := range pids {
			byPid[uint32(p)] = l
		}
	}
	if len(byPid) == 0 {
		return nil, nil, nil
	}
	t.prof.Lock()
	p, sums, err := t.s.Profile(func(pid uint32) bool { _, ok := byPid[pid]; return ok })
	t.prof.Unlock()
	if err != nil {
		return nil, nil, err
	}
	for i := range p.Samples {
		smp := &p.Samples[i]
		if smp.Labels == nil {
			smp.Labels = map[string]string{}
		}
		pid, _ := strconv.Atoi(smp.Labels["pid"])
		if l, ok := byPid[uint32(pid)]; ok {
			smp.Labels["namespace"] = l.Namespace
			smp.Labels["pod"] = l.Pod
			smp.Labels["container"] = l.Container
		}
		smp.Labels["node"] = a.cfg.NodeName
	}
	return p, sums, nil
}

// saveRSSProfiles writes one RSS profile per container
// (profiles/<ns>_<pod>_<container>/<time>.rss.pb.gz, removed with the heap
// profiles by the retention), pushes it to Pyroscope when configured, and
// updates the per-container figures.
func (a *Agent) saveRSSProfiles(ctx context.Context) {
	a.mu.Lock()
	t := a.rss
	a.mu.Unlock()
	if t == nil {
		return
	}
	t.mu.Lock()
	dirs := map[string]labelSet{}
	for d, l := range t.dirs {
		dirs[d] = l
	}
	t.mu.Unlock()
	now := time.Now()
	from := now.Add(-a.cfg.ProfileInterval)
	for dir, l := range dirs {
		if ctx.Err() != nil {
			return
		}
		p, sums, err := a.rssProfileOf(t, map[string]labelSet{dir: l})
		if err != nil {
			a.cfg.Log.Error("RSS profile", l.logAttrs("cgroup", dir, "err", err)...)
			continue
		}
		if p == nil {
			continue
		}
		var fig [3]int64
		var reg rss.Regions
		for _, s := range sums {
			fig[0] += s.Attributed
			fig[1] += s.Before
			fig[2] += s.Faulted
			reg.Brk += s.Regions.Brk
			reg.Anon += s.Regions.Anon
			reg.Stack += s.Regions.Stack
			reg.Data += s.Regions.Data
		}
		t.mu.Lock()
		t.figures[l] = fig
		t.regions[l] = reg
		t.mu.Unlock()
		if len(p.Samples) == 0 {
			continue
		}
		built, err := pprofout.BuildRSS(p)
		if err != nil {
			a.cfg.Log.Error("build RSS profile", l.logAttrs("cgroup", dir, "err", err)...)
			continue
		}
		var buf bytes.Buffer
		if err := built.Write(&buf); err != nil {
			continue
		}
		cdir := a.containerDir(&container{labels: l})
		if err := os.MkdirAll(cdir, 0o755); err == nil {
			path := filepath.Join(cdir, now.UTC().Format("20060102T150405Z")+".rss.pb.gz")
			if err := writeAtomic(path, buf.Bytes()); err != nil {
				a.cfg.Log.Error("keep RSS profile", l.logAttrs("path", path, "err", err)...)
			}
		}
		if a.cfg.PyroscopeURL != "" {
			a.push(ctx, l, from, now, buf.Bytes(), rssPyroscopeTypes)
		}
	}
	// the heap tier's saveProfiles applies the retention to every file of
	// profiles/ (heap and RSS); do it here too, so that RSS profiles age
	// out when no container is selected for allocator probes
	a.applyRetention(now)
}

// serveRSS serves GET /profiles/rss?namespace=&pod=&container=: the RSS
// profile of the container(s) now, gzipped pprof (default sample type
// rss_space). Parameters as /profiles/heap; 404 names the containers the
// RSS tier follows.
func (a *Agent) serveRSS(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, pod, name := q.Get("namespace"), q.Get("pod"), q.Get("container")
	if pod == "" {
		http.Error(w, "give ?pod=NAME (and namespace=, container=); GET /profiles/rss?pod= with an unknown pod lists the containers with RSS profiles", http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	t := a.rss
	a.mu.Unlock()
	if t == nil {
		http.Error(w, "RSS profiles are off on this node (--no-rss, or the kernel lacks the page-fault tracepoints: see the agent's log)", http.StatusNotFound)
		return
	}
	dirs := map[string]labelSet{}
	t.mu.Lock()
	for d, l := range t.dirs {
		if l.Pod == pod && (ns == "" || l.Namespace == ns) && (name == "" || l.Container == name) {
			dirs[d] = l
		}
	}
	t.mu.Unlock()
	if len(dirs) == 0 {
		known := a.RSSProfiled()
		sort.Strings(known)
		if len(known) > 50 {
			known = append(known[:50], fmt.Sprintf("... (%d more)", len(known)-50))
		}
		http.Error(w, fmt.Sprintf("no container with RSS profiles namespace=%q pod=%q container=%q on node %s; followed (namespace/pod/container): %s", ns, pod, name, a.cfg.NodeName, strings.Join(known, ", ")), http.StatusNotFound)
		return
	}
	p, _, err := a.rssProfileOf(t, dirs)
	if err == nil && p == nil {
		http.Error(w, fmt.Sprintf("no process in the cgroup of namespace=%q pod=%q container=%q (restarting?)", ns, pod, name), http.StatusNotFound)
		return
	}
	var built *profile.Profile
	if err == nil {
		built, err = pprofout.BuildRSS(p)
	}
	if err != nil {
		http.Error(w, "build RSS profile: "+err.Error(), http.StatusInternalServerError)
		return
	}
	var buf bytes.Buffer
	if err := built.Write(&buf); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="rss-%s-%s.pb.gz"`, unsafeName.ReplaceAllString(pod, "-"), time.Now().UTC().Format("20060102T150405Z")))
	_, _ = w.Write(buf.Bytes()) // an error is the client gone: nothing to tell it
}

// onRSSOOM writes the victim's RSS post-mortem next to the heap tier's
// (oom/oom-<time>-<comm>-<pid>.rss.pb.gz), for every victim in a container.
func (a *Agent) onRSSOOM(k *rss.OOMKill) {
	if k.Profile == nil {
		return
	}
	var l labelSet
	a.mu.Lock()
	if a.rss != nil {
		a.rss.mu.Lock()
		for dir, ls := range a.rss.dirs {
			if k.Memcg == dir {
				l = ls
			}
		}
		a.rss.mu.Unlock()
	}
	a.mu.Unlock()
	for i := range k.Profile.Samples {
		if l.Pod != "" {
			k.Profile.Samples[i].Labels["namespace"] = l.Namespace
			k.Profile.Samples[i].Labels["pod"] = l.Pod
			k.Profile.Samples[i].Labels["container"] = l.Container
		}
		k.Profile.Samples[i].Labels["node"] = a.cfg.NodeName
	}
	path, err := rss.WriteOOM(k, a.oomDir())
	if err != nil {
		a.cfg.Log.Error("RSS post-mortem", l.logAttrs("pid", k.Pid, "comm", k.Comm, "cgroup", k.Memcg, "err", err)...)
		return
	}
	a.linkRSSOOM(k.Pid, k.Time, path)
	a.cfg.Log.Warn("OOM kill: RSS post-mortem written", l.logAttrs("pid", k.Pid, "comm", k.Comm, "cgroup", k.Memcg, "post_mortem", path)...)
}

// rssOOMRef is an RSS post-mortem whose /oom entry has not been made yet.
type rssOOMRef struct {
	path string
	at   time.Time // the kill, as the RSS session saw it
}

// Bounds of the RSS post-mortems waiting for their /oom entry: the
// recorder's event of the same kill comes within a second or two; one that
// never comes (the heap tier's OOM events unsupported) leaves its file
// listed under oom/ only.
const (
	maxPendingRSSOOMs = 256
	rssOOMMatch       = time.Minute // same pid within this: the same kill
)

func sameKill(a, b time.Time) bool { return a.Sub(b).Abs() <= rssOOMMatch }

// linkRSSOOM records the RSS post-mortem path of victim pid in its /oom
// entry (OOMEntry.RSSProfile). The entry comes from the heap tier's OOM
// event, which may arrive before or after the RSS session's: before, the
// entry is updated (and its file rewritten); after, onOOM takes the path
// from the pending list.
func (a *Agent) linkRSSOOM(pid int, at time.Time, path string) {
	a.mu.Lock()
	for i := len(a.ooms) - 1; i >= 0; i-- {
		if e := &a.ooms[i]; e.Pid == pid && e.RSSProfile == "" && sameKill(e.Time, at) {
			e.RSSProfile = path
			a.writeEntry(e)
			a.mu.Unlock()
			return
		}
	}
	t := a.rss
	if t != nil {
		t.mu.Lock()
		for p, r := range t.oomPending {
			if time.Since(r.at) > rssOOMMatch || len(t.oomPending) >= maxPendingRSSOOMs {
				delete(t.oomPending, p)
			}
		}
		t.oomPending[pid] = rssOOMRef{path: path, at: at}
		t.mu.Unlock()
	}
	a.mu.Unlock()
}

// takeRSSOOM returns (and forgets) the RSS post-mortem of the kill of pid at
// time at, "" if none came yet. The caller holds a.mu.
func (a *Agent) takeRSSOOM(pid int, at time.Time) string {
	t := a.rss
	if t == nil {
		return ""
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.oomPending[pid]
	if !ok || !sameKill(r.at, at) {
		return ""
	}
	delete(t.oomPending, pid)
	return r.path
}

// RSSProfiled lists the containers whose cgroups the RSS tier follows.
func (a *Agent) RSSProfiled() []string {
	a.mu.Lock()
	t := a.rss
	a.mu.Unlock()
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for _, l := range t.dirs {
		out = append(out, fmt.Sprintf("%s/%s/%s", l.Namespace, l.Pod, l.Container))
	}
	return out
}

type rssCollector struct{ a *Agent }

var (
	descRSSProfiled = prometheus.NewDesc(MetricRSSSampled, "Anonymous resident bytes faulted in while memprof watched, by the stacks of the last RSS profile (estimate).", []string{"namespace", "pod", "container", "node"}, nil)
	descRSSBefore   = prometheus.NewDesc(MetricRSSBefore, "Anonymous resident bytes that were resident before memprof started watching the process (last RSS profile).", []string{"namespace", "pod", "container", "node"}, nil)
	descRSSRegion   = prometheus.NewDesc(MetricRSSRegion, "Profiled anonymous resident bytes by kind of mapping (brk heap, anonymous mappings, main stack, written file data), last RSS profile (estimate).", []string{"namespace", "pod", "container", "node", "region"}, nil)
	descRSSFaulted  = prometheus.NewDesc(MetricRSSFaulted, "Anonymous bytes faulted in since memprof started watching (estimate, last RSS profile; includes memory given back since).", []string{"namespace", "pod", "container", "node"}, nil)
)

func (c *rssCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descRSSProfiled
	ch <- descRSSBefore
	ch <- descRSSFaulted
	ch <- descRSSRegion
}

func (c *rssCollector) Collect(ch chan<- prometheus.Metric) {
	c.a.mu.Lock()
	t := c.a.rss
	c.a.mu.Unlock()
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for l, f := range t.figures {
		lv := []string{l.Namespace, l.Pod, l.Container, c.a.cfg.NodeName}
		ch <- prometheus.MustNewConstMetric(descRSSProfiled, prometheus.GaugeValue, float64(f[0]), lv...)
		ch <- prometheus.MustNewConstMetric(descRSSBefore, prometheus.GaugeValue, float64(f[1]), lv...)
		ch <- prometheus.MustNewConstMetric(descRSSFaulted, prometheus.GaugeValue, float64(f[2]), lv...)
		r := t.regions[l]
		for _, kv := range []struct {
			k string
			v int64
		}{{"brk", r.Brk}, {"anon", r.Anon}, {"stack", r.Stack}, {"file_data", r.Data}} {
			ch <- prometheus.MustNewConstMetric(descRSSRegion, prometheus.GaugeValue, float64(kv.v), append(lv, kv.k)...)
		}
	}
}
