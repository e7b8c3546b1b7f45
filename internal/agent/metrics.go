package agent

import (
	"net/http"

	"github.com/memprof/memprof/internal/cgroups"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metric names.
const (
	MetricLiveHeap      = "memprof_container_live_heap_bytes"
	MetricAllocTotal    = "memprof_container_alloc_bytes_total"
	MetricAllocRate     = "memprof_container_alloc_rate_bytes_per_second"
	MetricRSSAnon       = "memprof_container_rss_anon_bytes"
	MetricFragRatio     = "memprof_container_fragmentation_ratio"
	MetricOOMKills      = "memprof_container_oom_kills_total"
	MetricProcesses     = "memprof_container_profiled_processes"
	MetricBudgetCont    = "memprof_container_budget_detached_processes_total"
	MetricProbeRate     = "memprof_probe_hits_per_second"
	MetricProbeTotal    = "memprof_probe_hits_total"
	MetricLost          = "memprof_events_lost_total"
	MetricMapEntries    = "memprof_bpf_map_entries"
	MetricMapCapacity   = "memprof_bpf_map_capacity"
	MetricTargets       = "memprof_target_processes"
	MetricProfiled      = "memprof_profiled_containers"
	MetricDiscovered    = "memprof_discovered_containers"
	MetricBudgetTotal   = "memprof_budget_detached_processes_total"
	MetricOOMTotal      = "memprof_oom_kills_total"
	MetricDiscoveryErrs = "memprof_discovery_errors_total"
	MetricPushes        = "memprof_pyroscope_pushes_total"
	MetricSaved         = "memprof_profiles_saved_total"
	MetricNotProfiled   = "memprof_target_processes_not_profiled_total"
)

// containerLabels label the per-container metrics.
var containerLabels = []string{"namespace", "pod", "container", "node"}

// metricDescs describes the agent's own metrics.
type metricDescs struct {
	liveHeap, allocTotal, allocRate, rssAnon, fragRatio, processes, oomKills, budgetCont *prometheus.Desc

	budgetTotal, oomTotal, probeRate, probeTotal, profiled, discovered, discErrs, pushes, saved *prometheus.Desc

	lost, targets, notProfiled, mapEntries, mapCapacity *prometheus.Desc
}

func newMetricDescs() *metricDescs {
	c := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, containerLabels, nil)
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &metricDescs{
		liveHeap:   c(MetricLiveHeap, "Estimated live native heap bytes of the container (unsampled sampled live blocks)."),
		allocTotal: c(MetricAllocTotal, "Estimated bytes allocated by the container's profiled processes since profiling started."),
		allocRate:  c(MetricAllocRate, "Estimated allocation rate of the container, bytes per second (alloc_space deltas)."),
		rssAnon:    c(MetricRSSAnon, "Anonymous resident memory of the container's memory cgroup (memory.stat anon / total_rss)."),
		fragRatio:  c(MetricFragRatio, "RSS anon / estimated live heap of the container (only when the live heap is at least 1 MiB)."),
		processes:  c(MetricProcesses, "Processes of the container being profiled."),
		oomKills:   c(MetricOOMKills, "OOM kills seen in the container since the agent started (profiled or not)."),
		budgetCont: c(MetricBudgetCont, "Processes of the container detached because they exceeded --max-calls-per-second."),

		budgetTotal: d(MetricBudgetTotal, "Target processes detached by the overhead budget."),
		oomTotal:    d(MetricOOMTotal, "OOM kills seen on the node, by whether the victim was profiled.", "profiled"),
		probeRate:   d(MetricProbeRate, "Allocator probe hits per second over the last collection interval."),
		probeTotal:  d(MetricProbeTotal, "Allocator probe hits since the agent started."),
		profiled:    d(MetricProfiled, "Containers being profiled."),
		discovered:  d(MetricDiscovered, "Kubernetes containers discovered on the node."),
		discErrs:    d(MetricDiscoveryErrs, "Failed pod discoveries."),
		pushes:      d(MetricPushes, "Profiles pushed to Pyroscope, by result.", "result"),
		saved:       d(MetricSaved, "Periodic profiles written to --data-dir."),

		lost:        d(MetricLost, "Events the BPF side dropped, by cause.", "cause"),
		targets:     d(MetricTargets, "Processes with probes attached."),
		notProfiled: d(MetricNotProfiled, "Processes of profiled containers not profiled, or not completely, by cause (skipped_no_allocator, skipped_exited_before_attach, skipped_attach_failed, skipped_excluded, lost_state_unreadable, lost_kept_state_bound, exec_replaced_image, lost_process_event_overruns).", "cause"),
		mapEntries:  d(MetricMapEntries, "Entries in the agent's BPF maps (live sampled blocks, allocation buckets, stacks, per-process call counts).", "map"),
		mapCapacity: d(MetricMapCapacity, "Capacity (max_entries) of the agent's BPF maps.", "map"),
	}
}

// agentCollector produces the agent's metrics from its state at scrape time.
type agentCollector struct {
	a *Agent
	d *metricDescs
}

// newRegistry returns the registry /metrics serves: the Go runtime and
// process collectors and the agent's own metrics.
func newRegistry(a *Agent) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&agentCollector{a: a, d: newMetricDescs()},
	)
	return reg
}

func (a *Agent) metricsHandler() http.Handler {
	return promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{})
}

// Describe implements prometheus.Collector.
func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	d := c.d
	for _, desc := range []*prometheus.Desc{
		d.liveHeap, d.allocTotal, d.allocRate, d.rssAnon, d.fragRatio, d.processes, d.oomKills, d.budgetCont,
		d.budgetTotal, d.oomTotal, d.probeRate, d.probeTotal, d.profiled, d.discovered, d.discErrs, d.pushes, d.saved,
		d.lost, d.targets, d.notProfiled, d.mapEntries, d.mapCapacity,
	} {
		ch <- desc
	}
}

// containerFigures are the figures of one label set (containers sharing
// labels, e.g. a restarted container whose predecessor is still listed,
// are added up: Prometheus refuses two series with the same labels).
type containerFigures struct {
	live, allocTot, allocRate float64
	procs                     int
	dirs                      []string // memory cgroups, whose RSS is read now
}

// Collect implements prometheus.Collector.
func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	a, d := c.a, c.d
	a.freshFigures()
	node := a.cfg.NodeName
	emit := func(desc *prometheus.Desc, typ prometheus.ValueType, v float64, labels ...string) {
		// NewConstMetric fails only on label values that are not UTF-8:
		// such a series is left out rather than fail the whole scrape.
		if m, err := prometheus.NewConstMetric(desc, typ, v, labels...); err == nil {
			ch <- m
		}
	}
	cl := func(l labelSet) []string { return []string{l.Namespace, l.Pod, l.Container, node} }

	a.mu.Lock()
	s := a.s
	figs := map[labelSet]*containerFigures{}
	for _, ct := range a.profiled {
		f := figs[ct.labels]
		if f == nil {
			f = &containerFigures{}
			figs[ct.labels] = f
		}
		f.live += ct.live
		f.allocTot += ct.allocTot
		f.allocRate += ct.allocRate
		f.dirs = append(f.dirs, ct.dir)
		f.procs += ct.procs
	}
	oomKills := make(map[labelSet]uint64, len(a.oomKills))
	for l, n := range a.oomKills {
		oomKills[l] = n
	}
	budgetHits := make(map[labelSet]uint64, len(a.budgetHits))
	for l, n := range a.budgetHits {
		budgetHits[l] = n
	}
	budgetAll, oomProfiled, oomOther := a.budgetAll, a.oomTotal[true], a.oomTotal[false]
	probeRate, probeTotal := a.probeRate, a.probeTotal
	nProfiled, nKnown := len(a.profiled), len(a.known)
	discErrs, pushes, pushErrs, saved := a.discErrs, a.pushes, a.pushErrs, a.saved
	a.mu.Unlock()

	for l, f := range figs {
		emit(d.liveHeap, prometheus.GaugeValue, f.live, cl(l)...)
		emit(d.allocTotal, prometheus.CounterValue, f.allocTot, cl(l)...)
		emit(d.allocRate, prometheus.GaugeValue, f.allocRate, cl(l)...)
		// RSS is read at scrape time, one memory.stat per container:
		// nothing reads it between scrapes.
		var rssAnon float64
		haveRSS := false
		for _, dir := range f.dirs {
			if v, err := cgroups.AnonBytes(dir); err == nil {
				rssAnon += float64(v)
				haveRSS = true
			}
		}
		if haveRSS {
			emit(d.rssAnon, prometheus.GaugeValue, rssAnon, cl(l)...)
			if f.live >= 1<<20 {
				emit(d.fragRatio, prometheus.GaugeValue, rssAnon/f.live, cl(l)...)
			}
		}
		emit(d.processes, prometheus.GaugeValue, float64(f.procs), cl(l)...)
	}
	for l, n := range oomKills {
		emit(d.oomKills, prometheus.CounterValue, float64(n), cl(l)...)
	}
	for l, n := range budgetHits {
		emit(d.budgetCont, prometheus.CounterValue, float64(n), cl(l)...)
	}
	emit(d.budgetTotal, prometheus.CounterValue, float64(budgetAll))
	emit(d.oomTotal, prometheus.CounterValue, float64(oomProfiled), "true")
	emit(d.oomTotal, prometheus.CounterValue, float64(oomOther), "false")
	emit(d.probeRate, prometheus.GaugeValue, probeRate)
	emit(d.probeTotal, prometheus.CounterValue, float64(probeTotal))
	emit(d.profiled, prometheus.GaugeValue, float64(nProfiled))
	emit(d.discovered, prometheus.GaugeValue, float64(nKnown))
	emit(d.discErrs, prometheus.CounterValue, float64(discErrs))
	emit(d.pushes, prometheus.CounterValue, float64(pushes), "ok")
	emit(d.pushes, prometheus.CounterValue, float64(pushErrs), "error")
	emit(d.saved, prometheus.CounterValue, float64(saved))

	if s == nil { // Run has not loaded the programs yet
		return
	}
	if cnt, err := s.Counters(); err == nil {
		for _, l := range cnt.Losses() {
			emit(d.lost, prometheus.CounterValue, float64(l.Count), l.Cause)
		}
	}
	emit(d.targets, prometheus.GaugeValue, float64(len(s.Targets())))
	for cause, n := range s.TargetCounts() {
		emit(d.notProfiled, prometheus.CounterValue, float64(n), cause)
	}
	for _, m := range s.MapStats() {
		emit(d.mapEntries, prometheus.GaugeValue, float64(m.Entries), m.Name)
		emit(d.mapCapacity, prometheus.GaugeValue, float64(m.Capacity), m.Name)
	}
}
