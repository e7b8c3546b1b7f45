package agent

import (
	"bufio"
	"bytes"
	"fmt"
	"math"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// expo writes the Prometheus text exposition format (version 0.0.4).
type expo struct {
	buf  bytes.Buffer
	seen map[string]bool
}

func (e *expo) family(name, typ, help string) {
	if e.seen == nil {
		e.seen = map[string]bool{}
	}
	if e.seen[name] {
		return
	}
	e.seen[name] = true
	fmt.Fprintf(&e.buf, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

func escapeLabel(v string) string {
	v = strings.ReplaceAll(v, `\`, `\\`)
	v = strings.ReplaceAll(v, "\n", `\n`)
	return strings.ReplaceAll(v, `"`, `\"`)
}

// sample writes one sample; labels are name, value pairs.
func (e *expo) sample(name string, v float64, labels ...string) {
	e.buf.WriteString(name)
	if len(labels) > 0 {
		e.buf.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				e.buf.WriteByte(',')
			}
			fmt.Fprintf(&e.buf, `%s="%s"`, labels[i], escapeLabel(labels[i+1]))
		}
		e.buf.WriteByte('}')
	}
	e.buf.WriteByte(' ')
	switch {
	case math.IsNaN(v):
		e.buf.WriteString("NaN")
	case math.IsInf(v, 1):
		e.buf.WriteString("+Inf")
	case math.IsInf(v, -1):
		e.buf.WriteString("-Inf")
	default:
		e.buf.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
	}
	e.buf.WriteByte('\n')
}

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
)

func (a *Agent) serveMetrics(w http.ResponseWriter, r *http.Request) {
	var e expo
	node := a.cfg.NodeName
	cl := func(l labelSet) []string {
		return []string{"namespace", l.Namespace, "pod", l.Pod, "container", l.Container, "node", node}
	}
	a.mu.Lock()
	up := a.s != nil
	conts := make([]*container, 0, len(a.profiled))
	for _, c := range a.profiled {
		conts = append(conts, c)
	}
	sort.Slice(conts, func(i, j int) bool { return conts[i].name() < conts[j].name() })
	e.family(MetricLiveHeap, "gauge", "Estimated live native heap bytes of the container (unsampled sampled live blocks).")
	for _, c := range conts {
		e.sample(MetricLiveHeap, c.live, cl(c.labels)...)
	}
	e.family(MetricAllocTotal, "counter", "Estimated bytes allocated by the container's profiled processes since profiling started.")
	for _, c := range conts {
		e.sample(MetricAllocTotal, c.allocTot, cl(c.labels)...)
	}
	e.family(MetricAllocRate, "gauge", "Estimated allocation rate of the container, bytes per second (alloc_space deltas).")
	for _, c := range conts {
		e.sample(MetricAllocRate, c.allocRate, cl(c.labels)...)
	}
	e.family(MetricRSSAnon, "gauge", "Anonymous resident memory of the container's memory cgroup (memory.stat anon / total_rss).")
	for _, c := range conts {
		if c.haveRSS {
			e.sample(MetricRSSAnon, c.rssAnon, cl(c.labels)...)
		}
	}
	e.family(MetricFragRatio, "gauge", "RSS anon / estimated live heap of the container (only when the live heap is at least 1 MiB).")
	for _, c := range conts {
		if c.haveRSS && c.live >= 1<<20 {
			e.sample(MetricFragRatio, c.rssAnon/c.live, cl(c.labels)...)
		}
	}
	e.family(MetricProcesses, "gauge", "Processes of the container being profiled.")
	for _, c := range conts {
		e.sample(MetricProcesses, float64(c.procs), cl(c.labels)...)
	}
	e.family(MetricOOMKills, "counter", "OOM kills seen in the container since the agent started (profiled or not).")
	keys := make([]labelSet, 0, len(a.oomKills))
	for l := range a.oomKills {
		keys = append(keys, l)
	}
	sort.Slice(keys, func(i, j int) bool { return fmt.Sprint(keys[i]) < fmt.Sprint(keys[j]) })
	for _, l := range keys {
		e.sample(MetricOOMKills, float64(a.oomKills[l]), cl(l)...)
	}
	e.family(MetricBudgetCont, "counter", "Processes of the container detached because they exceeded --max-calls-per-second.")
	keys = keys[:0]
	for l := range a.budgetHits {
		keys = append(keys, l)
	}
	sort.Slice(keys, func(i, j int) bool { return fmt.Sprint(keys[i]) < fmt.Sprint(keys[j]) })
	for _, l := range keys {
		e.sample(MetricBudgetCont, float64(a.budgetHits[l]), cl(l)...)
	}
	e.family(MetricBudgetTotal, "counter", "Target processes detached by the overhead budget.")
	e.sample(MetricBudgetTotal, float64(a.budgetAll))
	e.family(MetricOOMTotal, "counter", "OOM kills seen on the node, by whether the victim was profiled.")
	e.sample(MetricOOMTotal, float64(a.oomTotal[true]), "profiled", "true")
	e.sample(MetricOOMTotal, float64(a.oomTotal[false]), "profiled", "false")
	e.family(MetricProbeRate, "gauge", "Allocator probe hits per second over the last collection interval.")
	e.sample(MetricProbeRate, a.probeRate)
	e.family(MetricProbeTotal, "counter", "Allocator probe hits since the agent started.")
	e.sample(MetricProbeTotal, float64(a.probeTotal))
	e.family(MetricProfiled, "gauge", "Containers being profiled.")
	e.sample(MetricProfiled, float64(len(a.profiled)))
	e.family(MetricDiscovered, "gauge", "Kubernetes containers discovered on the node.")
	e.sample(MetricDiscovered, float64(len(a.known)))
	e.family(MetricDiscoveryErrs, "counter", "Failed pod discoveries.")
	e.sample(MetricDiscoveryErrs, float64(a.discErrs))
	e.family(MetricPushes, "counter", "Profiles pushed to Pyroscope, by result.")
	e.sample(MetricPushes, float64(a.pushes), "result", "ok")
	e.sample(MetricPushes, float64(a.pushErrs), "result", "error")
	e.family(MetricSaved, "counter", "Periodic profiles written to --data-dir.")
	e.sample(MetricSaved, float64(a.saved))
	a.mu.Unlock()

	if up {
		if c, err := a.s.Counters(); err == nil {
			e.family(MetricLost, "counter", "Events the BPF side dropped, by cause.")
			for _, k := range lostCauses {
				e.sample(MetricLost, float64(c.Lost()[k]), "cause", k)
			}
		}
		e.family(MetricTargets, "gauge", "Processes with probes attached.")
		e.sample(MetricTargets, float64(len(a.s.Targets())))
		e.family(MetricMapEntries, "gauge", "Entries in the agent's BPF maps (live sampled blocks, allocation buckets, stacks, per-process call counts).")
		stats := MapStats()
		for _, m := range stats {
			e.sample(MetricMapEntries, float64(m.Entries), "map", m.Name)
		}
		e.family(MetricMapCapacity, "gauge", "Capacity (max_entries) of the agent's BPF maps.")
		for _, m := range stats {
			e.sample(MetricMapCapacity, float64(m.Capacity), "map", m.Name)
		}
	}
	writeProcessMetrics(&e, a.start)

	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Write(e.buf.Bytes())
}

var lostCauses = []string{"missed_return_probe", "nesting_overflow", "no_thread_state", "live_map_full", "alloc_map_full",
	"stack_collision", "stack_walk_failed", "user_read_failed", "ringbuf_full"}

// writeProcessMetrics writes the agent's own CPU, memory and file
// descriptors under the names of Prometheus' process collector.
func writeProcessMetrics(e *expo, start time.Time) {
	if b, err := os.ReadFile("/proc/self/stat"); err == nil {
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i > 0 {
			f := strings.Fields(s[i+1:])
			// fields after comm: state=0 ... utime=11 stime=12 ... starttime=19 vsize=20 rss=21
			if len(f) > 21 {
				ut, _ := strconv.ParseFloat(f[11], 64)
				st, _ := strconv.ParseFloat(f[12], 64)
				vs, _ := strconv.ParseFloat(f[20], 64)
				rss, _ := strconv.ParseFloat(f[21], 64)
				const hz = 100 // USER_HZ
				e.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
				e.sample("process_cpu_seconds_total", (ut+st)/hz)
				e.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
				e.sample("process_resident_memory_bytes", rss*float64(os.Getpagesize()))
				e.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
				e.sample("process_virtual_memory_bytes", vs)
			}
		}
	}
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		e.family("process_open_fds", "gauge", "Number of open file descriptors.")
		e.sample("process_open_fds", float64(len(ents)))
	}
	e.family("process_start_time_seconds", "gauge", "Start time of the agent since unix epoch in seconds.")
	e.sample("process_start_time_seconds", float64(start.Unix()))
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	e.family("go_memstats_heap_alloc_bytes", "gauge", "Bytes of the agent's Go heap in use.")
	e.sample("go_memstats_heap_alloc_bytes", float64(ms.HeapAlloc))
	e.family("go_goroutines", "gauge", "Number of goroutines.")
	e.sample("go_goroutines", float64(runtime.NumGoroutine()))
}

// MapStat is the occupancy of one BPF map of this process.
type MapStat struct {
	Name              string
	Entries, Capacity int
}

// countedMaps are the maps whose entries MapStats counts.
var countedMaps = map[string]bool{"live": true, "allocs": true, "stacks": true, "proc_calls": true}

// MapStats counts the entries of the session's BPF maps. The recorder does
// not expose its maps, so they are found among this process's file
// descriptors by name (the agent runs one session per process).
func MapStats() []MapStat {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	byName := map[string]*MapStat{}
	seenID := map[ebpf.MapID]bool{}
	for _, ent := range ents {
		fd, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink("/proc/self/fd/" + ent.Name())
		if err != nil || link != "anon_inode:bpf-map" {
			continue
		}
		if !isBPFMap(fd) {
			continue
		}
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			continue
		}
		m, err := ebpf.NewMapFromFD(dup)
		if err != nil {
			unix.Close(dup)
			continue
		}
		info, err := m.Info()
		if err != nil || !countedMaps[info.Name] {
			m.Close()
			continue
		}
		if id, ok := info.ID(); ok {
			if seenID[id] {
				m.Close()
				continue
			}
			seenID[id] = true
		}
		st := byName[info.Name]
		if st == nil {
			st = &MapStat{Name: info.Name}
			byName[info.Name] = st
		}
		st.Capacity += int(info.MaxEntries)
		st.Entries += countKeys(m)
		m.Close()
	}
	var out []MapStat
	for _, st := range byName {
		out = append(out, *st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// isBPFMap checks /proc/self/fdinfo for a BPF map.
func isBPFMap(fd int) bool {
	f, err := os.Open("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "map_type:") {
			return true
		}
	}
	return false
}

func countKeys(m *ebpf.Map) int {
	ks := int(m.KeySize())
	if ks == 0 {
		return 0
	}
	cur := make([]byte, ks)
	next := make([]byte, ks)
	n := 0
	if err := m.NextKey(nil, next); err != nil {
		return 0
	}
	for {
		n++
		copy(cur, next)
		if err := m.NextKey(cur, next); err != nil {
			return n
		}
		if n > int(m.MaxEntries())*2 {
			return n
		}
	}
}
