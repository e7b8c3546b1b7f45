package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
	"github.com/memprof/memprof/pprofout"
)

const (
	leakTotal  = 32 << 20 // bytes agent_leak_known leaks
	leakBlock  = 64 << 10
	sampleRate = 64 << 10
	churnRate  = 16 * (64 << 10) * 10 // agent_churn_step: 10 MiB/s nominal
	oomLimit   = 48 << 20
)

// ingest is one upload received by the fake Pyroscope server, parsed the
// way Pyroscope's /ingest handler does: query parameters name (app{k=v,...}),
// from, until, format; the pprof in the multipart field "profile".
type ingest struct {
	app         string
	labels      map[string]string
	from, until int64
	format      string
	prof        *profile.Profile
	// sampleTypes: the multipart field sample_type_config (JSON by
	// sample type), nil when absent
	sampleTypes map[string]map[string]any
}

// profileTypes are the profile type IDs (name:sample_type:unit:period_type:
// period_unit) Pyroscope 1.x files the upload under: the name is "memory"
// when a sample type, or its display-name in sample_type_config, contains
// inuse_ or alloc_ (the rule of Pyroscope's pkg/og/convert/pprof
// metricName, CPU and the rarer kinds left out), else the last sample type.
func (in ingest) profileTypes() []string {
	name := ""
	for _, st := range in.prof.SampleType {
		d := st.Type
		if c, ok := in.sampleTypes[st.Type]; ok {
			if dn, _ := c["display-name"].(string); dn != "" {
				d = dn
			}
		}
		if strings.Contains(d, "inuse_") || strings.Contains(d, "alloc_") {
			name = "memory"
			break
		}
		name = st.Type
	}
	var out []string
	for _, st := range in.prof.SampleType {
		pt := ":"
		if in.prof.PeriodType != nil {
			pt = in.prof.PeriodType.Type + ":" + in.prof.PeriodType.Unit
		}
		out = append(out, name+":"+st.Type+":"+st.Unit+":"+pt)
	}
	return out
}

// parseName splits a Pyroscope segment key "app{k=v,k2=v2}".
func parseName(s string) (string, map[string]string, error) {
	i := strings.IndexByte(s, '{')
	if i < 0 || !strings.HasSuffix(s, "}") {
		return s, map[string]string{}, nil
	}
	labels := map[string]string{}
	for _, kv := range strings.Split(s[i+1:len(s)-1], ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return "", nil, fmt.Errorf("bad label %q in %q", kv, s)
		}
		labels[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return s[:i], labels, nil
}

type fakePyroscope struct {
	mu   sync.Mutex
	got  []ingest
	errs []string
}

func (f *fakePyroscope) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	fail := func(msg string) {
		f.mu.Lock()
		f.errs = append(f.errs, msg)
		f.mu.Unlock()
		http.Error(w, msg, http.StatusBadRequest)
	}
	if r.Method != http.MethodPost || r.URL.Path != "/ingest" {
		fail(fmt.Sprintf("unexpected %s %s", r.Method, r.URL.Path))
		return
	}
	q := r.URL.Query()
	var in ingest
	var err error
	if in.app, in.labels, err = parseName(q.Get("name")); err != nil || in.app == "" {
		fail(fmt.Sprintf("name %q: %v", q.Get("name"), err))
		return
	}
	if _, err := fmt.Sscan(q.Get("from"), &in.from); err != nil {
		fail("from: " + err.Error())
		return
	}
	if _, err := fmt.Sscan(q.Get("until"), &in.until); err != nil {
		fail("until: " + err.Error())
		return
	}
	in.format = q.Get("format")
	if err := r.ParseMultipartForm(32 << 20); err != nil {
		fail("multipart: " + err.Error())
		return
	}
	file, _, err := r.FormFile("profile")
	if err != nil {
		fail("form field profile: " + err.Error())
		return
	}
	data, _ := io.ReadAll(file)
	if in.prof, err = profile.Parse(bytes.NewReader(data)); err != nil {
		fail("profile.Parse: " + err.Error())
		return
	}
	if cf, _, err := r.FormFile("sample_type_config"); err == nil {
		b, _ := io.ReadAll(cf)
		if err := json.Unmarshal(b, &in.sampleTypes); err != nil {
			fail("sample_type_config: " + err.Error())
			return
		}
	}
	f.mu.Lock()
	f.got = append(f.got, in)
	f.mu.Unlock()
}

func (f *fakePyroscope) uploads() ([]ingest, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]ingest(nil), f.got...), append([]string(nil), f.errs...)
}

func within(got, want, tol float64) bool { return math.Abs(got-want) <= tol*want }

func topOf(t *testing.T, p *profile.Profile, st string) pprofout.StackRow {
	t.Helper()
	rows, err := pprofout.Top(p, st, 5)
	if err != nil || len(rows) == 0 {
		t.Fatalf("top %s: %v (rows %d)", st, err, len(rows))
	}
	return rows[0]
}

func hasFrame(r pprofout.StackRow, fn string) bool {
	return len(r.Frames) > 0 && strings.HasPrefix(r.Frames[0], fn)
}

// TestAgentPods runs the agent against real runc containers in
// kubelet-style cgroups: discovery of a pod started after the agent,
// metrics, heap and alloc profiles, a real Prometheus scraping it, the
// Pyroscope push, the OOM post-mortem of a profiled container and the OOM
// event of an unprofiled one, and detaching when the container goes.
func TestAgentPods(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	root := kube.Rootfs(t, bin)
	fsRoot := "memprof-agent-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpa-" + randHex(6)
	otherNS := "mpb-" + randHex(6)

	pyro := &fakePyroscope{}
	pyroSrv := httptest.NewServer(pyro)
	t.Cleanup(pyroSrv.Close)

	a, tok, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		ProfileInterval:  time.Second,
		Retention:        time.Hour,
		PyroscopeURL:     pyroSrv.URL,
		SampleRate:       sampleRate,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
	})
	base := "http://" + a.Addr()

	// security: open /healthz and /metrics, the rest needs the token
	if code, _ := get(t, base+"/healthz", ""); code != 200 {
		t.Errorf("/healthz without token: %d, want 200", code)
	}
	if code, _ := get(t, base+"/metrics", ""); code != 200 {
		t.Errorf("/metrics without token: %d, want 200", code)
	}
	for _, tk := range []string{"", "wrong" + tok[5:]} {
		if code, _ := get(t, base+"/oom", tk); code != http.StatusUnauthorized {
			t.Errorf("/oom with token %q: %d, want 401", tk, code)
		}
		if code, _ := get(t, base+"/profiles/heap?pod=x", tk); code != http.StatusUnauthorized {
			t.Errorf("/profiles/heap with token %q: %d, want 401", tk, code)
		}
	}

	// a pod started after the agent
	leaky := kube.Pod{Namespace: ns, Name: "leaky", UID: newUID()}
	lc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: leaky, Name: "app", Rootfs: root, Logs: logs, Args: []string{"/agent_workload", "leak", fmt.Sprint(leakTotal), fmt.Sprint(leakBlock)}})
	waitFor(t, 10*time.Second, "the container to start", func() bool { return strings.Contains(lc.Output(), "waiting") })
	t0 := time.Now()
	waitFor(t, 15*time.Second, "the agent to attach to the leaky container", func() bool {
		c := findContainer(a, ns, "leaky")
		return c != nil && c.Processes >= 1 && c.Container == "app"
	})
	t.Logf("agent attached to %s/leaky/app %s after the container started", ns, time.Since(t0).Round(time.Millisecond))
	if err := syscall.Kill(lc.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the container to leak", func() bool { return strings.Contains(lc.Output(), "leaked") })
	labels := map[string]string{"namespace": ns, "pod": "leaky", "container": "app", "node": "test-node"}
	var text string
	waitFor(t, 10*time.Second, "the live heap metric", func() bool {
		_, b := get(t, base+"/metrics", "")
		text = string(b)
		v, ok := metric(text, MetricLiveHeap, labels)
		return ok && v > leakTotal/2
	})
	time.Sleep(3 * time.Second) // let the allocation rate settle over several intervals
	_, b := get(t, base+"/metrics", "")
	text = string(b)

	// metrics against truth
	live, _ := metric(text, MetricLiveHeap, labels)
	t.Logf("live heap metric %.1f MiB (truth %d MiB leaked + churn in flight)", live/(1<<20), leakTotal>>20)
	if !within(live, leakTotal, 0.15) {
		t.Errorf("%s = %.0f, want %d ±15%%", MetricLiveHeap, live, leakTotal)
	}
	rss, ok := metric(text, MetricRSSAnon, labels)
	t.Logf("rss anon %.1f MiB", rss/(1<<20))
	if !ok || rss < 0.95*leakTotal || rss > 2*leakTotal {
		t.Errorf("%s = %.0f (present %t), want between %.0f and %d (the leak touches every page)", MetricRSSAnon, rss, ok, 0.95*leakTotal, 2*leakTotal)
	}
	ratio, ok := metric(text, MetricFragRatio, labels)
	t.Logf("fragmentation ratio %.3f", ratio)
	if !ok || ratio < 0.8 || ratio > 1.4 {
		t.Errorf("%s = %.3f (present %t), want 0.8..1.4 (touched leak, little fragmentation)", MetricFragRatio, ratio, ok)
	}
	rate, ok := metric(text, MetricAllocRate, labels)
	t.Logf("allocation rate %.2f MiB/s (nominal %.2f MiB/s)", rate/(1<<20), float64(churnRate)/(1<<20))
	if !ok || !within(rate, churnRate, 0.4) {
		t.Errorf("%s = %.0f, want %d ±40%% (16×64 KiB per 100 ms sleep)", MetricAllocRate, rate, churnRate)
	}
	if v, ok := metric(text, MetricProcesses, labels); !ok || v != 1 {
		t.Errorf("%s = %v (present %t), want 1", MetricProcesses, v, ok)
	}
	for _, name := range []string{MetricProbeRate, MetricLost, MetricMapEntries, "process_cpu_seconds_total", "process_resident_memory_bytes", MetricTargets} {
		if !strings.Contains(text, "\n"+name) {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	if v, ok := metric(text, MetricMapEntries, map[string]string{"map": "live"}); !ok || v < 1 {
		t.Errorf("%s{map=live} = %v (present %t), want > 0", MetricMapEntries, v, ok)
	}

	// the heap profile
	q := url.Values{"namespace": {ns}, "pod": {"leaky"}, "container": {"app"}}
	code, body := get(t, base+"/profiles/heap?"+q.Encode(), tok)
	if code != 200 {
		t.Fatalf("/profiles/heap: %d %s", code, body)
	}
	hp, err := profile.Parse(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse heap profile: %v", err)
	}
	top := topOf(t, hp, "inuse_space")
	t.Logf("top inuse stack: %s %.1f MiB", strings.Join(top.Frames[:min(3, len(top.Frames))], " < "), float64(top.Value)/(1<<20))
	if !hasFrame(top, "agent_leak_known") {
		t.Errorf("top inuse stack %v, want agent_leak_known first", top.Frames)
	}
	if !within(float64(top.Value), leakTotal, 0.15) {
		t.Errorf("agent_leak_known inuse %d bytes, want %d ±15%%", top.Value, leakTotal)
	}
	for _, s := range hp.Sample {
		if s.Label["namespace"][0] != ns || s.Label["pod"][0] != "leaky" || s.Label["container"][0] != "app" || s.Label["node"][0] != "test-node" {
			t.Errorf("sample labels %v, want namespace/pod/container/node of the container", s.Label)
			break
		}
	}
	if code, _ := get(t, base+"/profiles/heap?namespace="+ns+"&pod=nope", tok); code != 404 {
		t.Errorf("heap profile of an unknown pod: %d, want 404", code)
	}

	// an alloc profile over a 2 s window: agent_churn_step allocates 10 MiB/s
	code, body = get(t, base+"/profiles/heap?"+q.Encode()+"&seconds=2", tok)
	if code != 200 {
		t.Fatalf("/profiles/heap?seconds=2: %d %s", code, body)
	}
	ap, err := profile.Parse(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse alloc profile: %v", err)
	}
	atop := topOf(t, ap, "alloc_space")
	t.Logf("alloc profile over 2s: top %s %.1f MiB (nominal %.1f MiB)", atop.Frames[0], float64(atop.Value)/(1<<20), 2*float64(churnRate)/(1<<20))
	if !hasFrame(atop, "agent_churn_step") || !within(float64(atop.Value), 2*churnRate, 0.4) {
		t.Errorf("alloc profile top %v %d bytes, want agent_churn_step ≈ %d ±40%%", atop.Frames, atop.Value, 2*churnRate)
	}
	if ap.DurationNanos != 2e9 {
		t.Errorf("alloc profile duration %d ns, want 2s", ap.DurationNanos)
	}

	// a real Prometheus scraping the agent
	checkPrometheus(t, a.Addr(), ns, leakTotal)

	// Pyroscope push
	var up ingest
	waitFor(t, 10*time.Second, "a Pyroscope upload of the leaky pod's heap profile", func() bool {
		got, _ := pyro.uploads()
		for _, g := range got {
			// (its RSS profile is pushed too, perhaps first: the heap
			// profile of an interval with no sample is not pushed)
			if g.labels["pod"] == "leaky" && slices.Contains(g.profileTypes(), "memory:inuse_space:bytes:space:bytes") {
				up = g
				return true
			}
		}
		return false
	})
	if _, errs := pyro.uploads(); len(errs) > 0 {
		t.Errorf("fake Pyroscope rejected requests: %v", errs)
	}
	t.Logf("pyroscope upload: app %q labels %v from %d until %d format %s, %d samples", up.app, up.labels, up.from, up.until, up.format, len(up.prof.Sample))
	wantL := map[string]string{"service_name": ns + "/app", "namespace": ns, "pod": "leaky", "container": "app", "node": "test-node"}
	for k, v := range wantL {
		if up.labels[k] != v {
			t.Errorf("pyroscope label %s = %q, want %q", k, up.labels[k], v)
		}
	}
	if up.app != ns+"/app" || up.format != "pprof" || up.until <= up.from || up.until < t0.Unix() {
		t.Errorf("pyroscope upload app %q format %q from %d until %d", up.app, up.format, up.from, up.until)
	}
	if types := up.profileTypes(); !slices.Contains(types, "memory:inuse_space:bytes:space:bytes") {
		t.Errorf("heap upload's Pyroscope profile types %v, want memory:inuse_space:bytes:space:bytes", types)
	}
	if ptop := topOf(t, up.prof, "inuse_space"); !hasFrame(ptop, "agent_leak_known") {
		t.Errorf("pushed profile's top inuse stack %v, want agent_leak_known", ptop.Frames)
	}
	if files, _ := a.StoredProfiles(); len(files) == 0 {
		t.Errorf("no periodic profile kept under the data dir")
	} else {
		t.Logf("%d periodic profiles kept, e.g. %s", len(files), files[0])
	}

	// OOM kill of a profiled container
	oomPod := kube.Pod{Namespace: ns, Name: "oomer", UID: newUID()}
	oc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: oomPod, Name: "hog", Rootfs: root, Logs: logs, MemLimit: oomLimit, Args: []string{"/agent_workload", "oom", fmt.Sprint(1 << 20)}})
	waitFor(t, 15*time.Second, "the agent to attach to the oomer container", func() bool {
		c := findContainer(a, ns, "oomer")
		return c != nil && c.Processes >= 1
	})
	syscall.Kill(oc.Pid, syscall.SIGUSR1)
	// and of one that is not profiled
	other := kube.Pod{Namespace: otherNS, Name: "bystander", UID: newUID()}
	xc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: other, Name: "hog", Rootfs: root, Logs: logs, MemLimit: oomLimit, Args: []string{"/agent_workload", "oom", fmt.Sprint(1 << 20)}})
	waitFor(t, 10*time.Second, "the unprofiled container to start", func() bool { return strings.Contains(xc.Output(), "waiting") })
	syscall.Kill(xc.Pid, syscall.SIGUSR1)

	var entries []OOMEntry
	waitFor(t, 20*time.Second, "/oom to list both OOM kills", func() bool {
		code, body := get(t, base+"/oom", tok)
		if code != 200 {
			return false
		}
		entries = nil
		json.Unmarshal(body, &entries)
		n := 0
		for _, e := range entries {
			if e.Pod == "oomer" || e.Pod == "bystander" {
				n++
			}
		}
		return n >= 2
	})
	for _, e := range entries {
		t.Logf("oom entry: %s/%s/%s pid %d %s profiled=%t kind=%s profile=%s", e.Namespace, e.Pod, e.Container, e.Pid, e.Comm, e.Profiled, e.Kind, e.Profile)
		switch e.Pod {
		case "oomer":
			if !e.Profiled || e.Container != "hog" || e.Namespace != ns || e.Kind != "cgroup-limit" || e.Report == "" {
				t.Errorf("oomer entry %+v: want profiled, container hog, kind cgroup-limit, a report", e)
			}
			pp, err := pprofout.ReadFile(e.Profile)
			if err != nil {
				t.Errorf("OOM profile %q: %v", e.Profile, err)
				continue
			}
			otop := topOf(t, pp, "inuse_space")
			t.Logf("OOM profile top: %s %.1f MiB (limit %d MiB)", otop.Frames[0], float64(otop.Value)/(1<<20), oomLimit>>20)
			if float64(otop.Value) < 0.6*oomLimit || float64(otop.Value) > 1.15*oomLimit {
				t.Errorf("OOM profile top %v %d bytes: want 60%%..115%% of the %d limit", otop.Frames, otop.Value, oomLimit)
			}
			if !hasFrame(otop, "agent_oom_grow") {
				t.Errorf("OOM profile top stack %v, want agent_oom_grow", otop.Frames)
			}
		case "bystander":
			if e.Profiled || e.Profile != "" || e.Report == "" || e.Namespace != otherNS || e.Kind != "cgroup-limit" {
				t.Errorf("bystander entry %+v: want unprofiled, no profile, a cgroup-limit report, namespace %s", e, otherNS)
			}
		}
		for _, p := range []string{e.Report, e.Text} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("post-mortem file: %v", err)
			}
		}
	}
	_, b = get(t, base+"/metrics", "")
	if v, ok := metric(string(b), MetricOOMKills, map[string]string{"namespace": ns, "pod": "oomer", "container": "hog"}); !ok || v != 1 {
		t.Errorf("%s{pod=oomer} = %v (present %t), want 1", MetricOOMKills, v, ok)
	}
	if v, ok := metric(string(b), MetricOOMKills, map[string]string{"namespace": otherNS, "pod": "bystander"}); !ok || v != 1 {
		t.Errorf("%s{pod=bystander} = %v (present %t), want 1", MetricOOMKills, v, ok)
	}

	// a restarted agent lists the post-mortems of the earlier run
	again, err := New(Config{Listen: "127.0.0.1:0", TokenFile: a.cfg.TokenFile, DataDir: a.cfg.DataDir, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	again.ln.Close()
	found := false
	for _, e := range again.OOMs() {
		if e.Pod == "oomer" && e.Namespace == ns && e.Container == "hog" && e.Profiled && e.Profile != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("a new agent on the same --data-dir does not list the oomer post-mortem: %+v", again.OOMs())
	}

	// the container goes: the agent detaches
	lc.Delete(t)
	oc.Delete(t)
	waitFor(t, 10*time.Second, "the agent to drop the deleted containers", func() bool {
		return findContainer(a, ns, "leaky") == nil && findContainer(a, ns, "oomer") == nil && a.TargetCount() == 0
	})
}

// checkPrometheus runs Debian's prometheus scraping the agent and queries
// the live-heap metric through its HTTP API.
func checkPrometheus(t *testing.T, agentAddr, ns string, want float64) {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus not found: install the Debian package prometheus (apt-get install prometheus): %v", err)
	}
	dir := t.TempDir()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n- job_name: memprof\n  static_configs:\n  - targets: ['%s']\n", agentAddr)
	writeFile(t, filepath.Join(dir, "prometheus.yml"), cfg)
	ln, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	query := fmt.Sprintf(`%s{namespace=%q,pod="leaky"}`, MetricLiveHeap, ns)
	type result struct {
		Metric map[string]string
		Value  [2]any
	}
	var res []result
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/api/v1/query?query=" + url.QueryEscape(query))
		if err == nil {
			var r struct {
				Status string
				Data   struct{ Result []result }
			}
			json.NewDecoder(resp.Body).Decode(&r)
			resp.Body.Close()
			if r.Status == "success" && len(r.Data.Result) > 0 {
				res = r.Data.Result
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus returned nothing for %s within 30s; its log:\n%s", query, out.String())
		}
		time.Sleep(300 * time.Millisecond)
	}
	m := res[0].Metric
	var v float64
	fmt.Sscan(fmt.Sprint(res[0].Value[1]), &v)
	t.Logf("Prometheus (after %s): %v = %.1f MiB", time.Since(start).Round(time.Millisecond), m, v/(1<<20))
	if m["__name__"] != MetricLiveHeap || m["namespace"] != ns || m["pod"] != "leaky" || m["container"] != "app" || m["node"] != "test-node" || m["job"] != "memprof" {
		t.Errorf("Prometheus series labels %v, want namespace=%s pod=leaky container=app node=test-node", m, ns)
	}
	if !within(v, want, 0.15) {
		t.Errorf("Prometheus value %.0f, want %.0f ±15%%", v, want)
	}
}
