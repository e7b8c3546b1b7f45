package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/rss"
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

type rssTier struct {
	s       *rss.Session
	mu      sync.Mutex
	dirs    map[string]labelSet   // cgroup directories followed
	figures map[labelSet][3]int64 // profiled, before, faulted (last profile)
	regions map[labelSet]rss.Regions
}

// startRSS starts the RSS session; without it (an old kernel) the agent
// runs with the allocator tier only, and says so.
func (a *Agent) startRSS(ctx context.Context) {
	if a.cfg.NoRSS {
		return
	}
	s, err := rss.Start(ctx, rss.Options{
		SampleRate: a.cfg.SampleRate,
		AllowEmpty: true,
		DropExited: true,
		AllOOMs:    true,
		Notify:     func(msg string) {},
		OOM:        a.onRSSOOM,
	})
	if err != nil {
		a.cfg.Logf("memprof agent: RSS profiles disabled: %v", err)
		return
	}
	t := &rssTier{s: s, dirs: map[string]labelSet{}, figures: map[labelSet][3]int64{}, regions: map[labelSet]rss.Regions{}}
	a.mu.Lock()
	a.rss = t
	a.mu.Unlock()
	a.reg.MustRegister(&rssCollector{a: a})
	a.cfg.Logf("memprof agent: RSS profiles of every container (page-fault tracepoints; OOM post-mortems: %v)", s.OOMSupported())
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
			a.cfg.Logf("memprof agent: RSS profiles of %s/%s/%s: %v", l.Namespace, l.Pod, l.Container, err)
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

// saveRSSProfiles writes one RSS profile per container
// (profiles/<ns>_<pod>_<container>/<time>.rss.pb.gz) and updates the
// per-container figures.
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
	for dir, l := range dirs {
		if ctx.Err() != nil {
			return
		}
		pids, err := cgroups.Procs(dir, true)
		if err != nil || len(pids) == 0 {
			continue
		}
		in := map[uint32]bool{}
		for _, p := range pids {
			in[uint32(p)] = true
		}
		p, sums, err := t.s.Profile(func(pid uint32) bool { return in[pid] })
		if err != nil {
			a.cfg.Logf("memprof agent: RSS profile of %s/%s/%s: %v", l.Namespace, l.Pod, l.Container, err)
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
		for i := range p.Samples {
			p.Samples[i].Labels["namespace"] = l.Namespace
			p.Samples[i].Labels["pod"] = l.Pod
			p.Samples[i].Labels["container"] = l.Container
			p.Samples[i].Labels["node"] = a.cfg.NodeName
		}
		cdir := a.containerDir(&container{labels: l})
		if err := os.MkdirAll(cdir, 0o755); err != nil {
			continue
		}
		path := filepath.Join(cdir, now.UTC().Format("20060102T150405Z")+".rss.pb.gz")
		if err := pprofout.WriteRSSFile(path, p); err != nil {
			a.cfg.Logf("memprof agent: keep RSS profile of %s/%s/%s: %v", l.Namespace, l.Pod, l.Container, err)
		}
	}
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
		a.cfg.Logf("memprof agent: RSS post-mortem of pid %d (%s): %v", k.Pid, k.Comm, err)
		return
	}
	a.cfg.Logf("memprof agent: OOM kill of pid %d (%s) in %s/%s/%s: RSS post-mortem %s", k.Pid, k.Comm, l.Namespace, l.Pod, l.Container, path)
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
