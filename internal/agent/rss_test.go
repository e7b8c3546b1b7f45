package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
	"github.com/memprof/memprof/pprofout"
)

// TestAgentRSS: containers that are not selected for allocator probes (no
// annotation, namespace not listed) get RSS profiles whose stacks hold the
// known leak, RSS metrics, and an RSS post-mortem when OOM-killed; an
// allocation-heavy container stays followed (no budget in this tier).
func TestAgentRSS(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	root := kube.Rootfs(t, bin)
	fsRoot := "memprof-agent-rss-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpr-" + randHex(6)
	data := t.TempDir()
	// an RSS profile older than the retention, left by an earlier run
	stale := filepath.Join(data, "profiles", ns+"_leaky_app", "20000101T000000Z.rss.pb.gz")
	writeFile(t, stale, "x")
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(stale, past, past)
	pyro := &fakePyroscope{}
	pyroSrv := httptest.NewServer(pyro)
	t.Cleanup(pyroSrv.Close)
	a, tok, _ := startAgent(t, Config{
		Paths:             podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:        []string{"not-" + ns}, // nothing of ns is selected for allocator probes
		DataDir:           data,
		ProfileInterval:   time.Second,
		Retention:         time.Hour,
		SampleRate:        sampleRate,
		DiscoverInterval:  300 * time.Millisecond,
		CollectInterval:   500 * time.Millisecond,
		MaxCallsPerSecond: 1000,
		PyroscopeURL:      pyroSrv.URL,
	})
	base := "http://" + a.Addr()

	leaky := kube.Pod{Namespace: ns, Name: "leaky", UID: newUID()}
	lc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: leaky, Name: "app", Rootfs: root, Logs: logs, Args: []string{"/agent_workload", "leak", fmt.Sprint(leakTotal), fmt.Sprint(leakBlock)}})
	hot := kube.Pod{Namespace: ns, Name: "hot", UID: newUID()}
	kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: hot, Name: "spin", Rootfs: root, Logs: logs, Args: []string{"/agent_workload", "hot"}})
	waitFor(t, 10*time.Second, "the container to start", func() bool { return strings.Contains(lc.Output(), "waiting") })
	waitFor(t, 15*time.Second, "the RSS tier to follow both containers", func() bool {
		n := 0
		for _, c := range a.RSSProfiled() {
			if strings.HasPrefix(c, ns+"/") {
				n++
			}
		}
		return n == 2
	})
	if err := syscall.Kill(lc.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the container to leak", func() bool { return strings.Contains(lc.Output(), "leaked") })
	tLeak := time.Now()
	dir := filepath.Join(data, "profiles", ns+"_leaky_app")
	var newest string
	waitFor(t, 15*time.Second, "an RSS profile of the leaky container after the leak", func() bool {
		ents, _ := filepath.Glob(filepath.Join(dir, "*.rss.pb.gz"))
		for _, e := range ents {
			st, err := os.Stat(e)
			if err == nil && st.ModTime().After(time.Now().Add(-1500*time.Millisecond)) {
				newest = e
			}
		}
		return newest != ""
	})
	p, err := pprofout.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	var inLeak int64
	for _, s := range p.Sample {
		for _, loc := range s.Location {
			for _, ln := range loc.Line {
				if ln.Function != nil && ln.Function.Name == "agent_leak_known" {
					inLeak += s.Value[2]
				}
			}
		}
		if s.Label["pod"][0] != "leaky" || s.Label["namespace"][0] != ns {
			t.Errorf("RSS sample labels %v, want the leaky pod's", s.Label)
			break
		}
	}
	t.Logf("RSS profile %s: agent_leak_known %.1f MiB rss_space (truth %d MiB)", filepath.Base(newest), float64(inLeak)/(1<<20), leakTotal>>20)
	if rows, err := pprofout.Top(p, pprofout.RSSSpace, 4); err == nil {
		var b strings.Builder
		pprofout.FormatTop(&b, rows, pprofout.RSSSpace, 8)
		t.Logf("top stacks:\n%s\ncomments %q", b.String(), p.Comments)
	}
	// 32 MiB in 4 KiB pages at the 64 KiB rate: sd ~1.4 MiB.
	if !within(float64(inLeak), leakTotal, 0.2) {
		t.Errorf("agent_leak_known rss_space %d, want %d ±20%%", inLeak, leakTotal)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Errorf("RSS profile %s older than the retention was kept", stale)
	}

	// GET /profiles/rss: the token, parameters, the profile now
	rssURL := base + "/profiles/rss?namespace=" + ns + "&pod=leaky&container=app"
	for _, tk := range []string{"", "wrong" + tok[5:]} {
		if code, _ := get(t, rssURL, tk); code != http.StatusUnauthorized {
			t.Errorf("/profiles/rss with token %q: %d, want 401", tk, code)
		}
	}
	if code, _ := get(t, base+"/profiles/rss?namespace="+ns, tok); code != http.StatusBadRequest {
		t.Errorf("/profiles/rss without pod: %d, want 400", code)
	}
	if code, body := get(t, base+"/profiles/rss?namespace="+ns+"&pod=nosuch", tok); code != http.StatusNotFound || !strings.Contains(string(body), ns+"/leaky/app") {
		t.Errorf("/profiles/rss of an unknown pod: %d %q, want 404 listing %s/leaky/app", code, body, ns)
	}
	code, body := get(t, rssURL, tok)
	if code != 200 {
		t.Fatalf("/profiles/rss: %d %s", code, body)
	}
	hp, err := profile.Parse(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse /profiles/rss: %v", err)
	}
	served := rssUnder(t, hp, "agent_leak_known", ns)
	t.Logf("GET /profiles/rss: agent_leak_known %.1f MiB rss_space (truth %d MiB), default sample type %s", float64(served)/(1<<20), leakTotal>>20, hp.DefaultSampleType)
	if !within(float64(served), leakTotal, 0.2) || hp.DefaultSampleType != pprofout.RSSSpace {
		t.Errorf("/profiles/rss: agent_leak_known rss_space %d, want %d ±20%%; default sample type %q", served, leakTotal, hp.DefaultSampleType)
	}

	// the RSS push to Pyroscope, from a profile taken after the leak
	var up ingest
	waitFor(t, 10*time.Second, "a Pyroscope RSS upload of the leaky pod after the leak", func() bool {
		got, _ := pyro.uploads()
		for _, g := range got {
			if g.labels["pod"] == "leaky" && g.until > tLeak.Unix() {
				up = g
				return true
			}
		}
		return false
	})
	if _, errs := pyro.uploads(); len(errs) > 0 {
		t.Errorf("fake Pyroscope rejected requests: %v", errs)
	}
	types := up.profileTypes()
	pushed := rssUnder(t, up.prof, "agent_leak_known", ns)
	t.Logf("pyroscope RSS upload: app %q labels %v types %v; agent_leak_known %.1f MiB rss_space", up.app, up.labels, types, float64(pushed)/(1<<20))
	wantL := map[string]string{"service_name": ns + "/app", "namespace": ns, "pod": "leaky", "container": "app", "node": "test-node"}
	for k, v := range wantL {
		if up.labels[k] != v {
			t.Errorf("pyroscope label %s = %q, want %q", k, up.labels[k], v)
		}
	}
	if !slices.Contains(types, "memory:rss_space:bytes:space:bytes") || up.format != "pprof" || up.app != ns+"/app" {
		t.Errorf("pyroscope RSS upload app %q format %q types %v, want memory:rss_space:bytes:space:bytes", up.app, up.format, types)
	}
	if !within(float64(pushed), leakTotal, 0.2) {
		t.Errorf("pushed RSS profile: agent_leak_known rss_space %d, want %d ±20%%", pushed, leakTotal)
	}

	_, b := get(t, base+"/metrics", "")
	v, ok := metric(string(b), MetricRSSSampled, map[string]string{"namespace": ns, "pod": "leaky"})
	t.Logf("%s = %.1f MiB", MetricRSSSampled, v/(1<<20))
	if !ok || v < 0.8*leakTotal {
		t.Errorf("%s = %v (present %t), want about %d", MetricRSSSampled, v, ok, leakTotal)
	}
	// 64 KiB blocks come from glibc's brk heap (below the mmap threshold).
	brk, ok := metric(string(b), MetricRSSRegion, map[string]string{"namespace": ns, "pod": "leaky", "region": "brk"})
	t.Logf("%s{region=brk} = %.1f MiB", MetricRSSRegion, brk/(1<<20))
	if !ok || brk < 0.8*leakTotal {
		t.Errorf("%s{region=brk} = %v (present %t), want about %d", MetricRSSRegion, brk, ok, leakTotal)
	}

	// OOM kill of a container that is not selected for allocator probes
	oomPod := kube.Pod{Namespace: ns, Name: "oomer", UID: newUID()}
	oc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: oomPod, Name: "hog", Rootfs: root, Logs: logs, MemLimit: oomLimit, Args: []string{"/agent_workload", "oom", fmt.Sprint(1 << 20)}})
	waitFor(t, 10*time.Second, "the oom container to start", func() bool { return strings.Contains(oc.Output(), "waiting") })
	waitFor(t, 15*time.Second, "the RSS tier to follow the oom container", func() bool {
		for _, c := range a.RSSProfiled() {
			if c == ns+"/oomer/hog" {
				return true
			}
		}
		return false
	})
	// Followed means the container's processes are targets; their unwind
	// tables are built after that, asynchronously. A container that
	// OOMs within milliseconds of being followed gets [truncated] stacks
	// (seen once in six CI runs with the whole suite in parallel): give the
	// tables time to be built, as a container that runs before it grows has.
	time.Sleep(500 * time.Millisecond)
	if err := syscall.Kill(oc.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var pm string
	waitFor(t, 30*time.Second, "the RSS post-mortem", func() bool {
		ents, _ := filepath.Glob(filepath.Join(data, "oom", "*agent_workload*.rss.pb.gz"))
		if len(ents) > 0 {
			pm = ents[0]
		}
		return pm != ""
	})
	// /oom lists the kill with its RSS post-mortem, served by /oom/file
	var entry OOMEntry
	waitFor(t, 20*time.Second, "/oom to list the kill with its RSS post-mortem", func() bool {
		_, b := get(t, base+"/oom", tok)
		var es []OOMEntry
		json.Unmarshal(b, &es)
		for _, e := range es {
			if e.RSSProfile == pm {
				entry = e
				return true
			}
		}
		return false
	})
	t.Logf("oom entry: %s/%s/%s pid %d %s profiled=%t rssProfile=%s report=%s", entry.Namespace, entry.Pod, entry.Container, entry.Pid, entry.Comm, entry.Profiled, entry.RSSProfile, entry.Report)
	if entry.Pod != "oomer" || entry.Namespace != ns || entry.Container != "hog" || entry.Profiled {
		t.Errorf("oom entry %+v, want the unprofiled %s/oomer/hog", entry, ns)
	}
	if code, b := get(t, base+"/oom/file?path="+url.QueryEscape(pm), tok); code != 200 {
		t.Errorf("/oom/file of the RSS post-mortem: %d", code)
	} else if _, err := profile.Parse(bytes.NewReader(b)); err != nil {
		t.Errorf("/oom/file of the RSS post-mortem: %v", err)
	}
	if entry.Report != "" {
		var saved OOMEntry
		b, _ := os.ReadFile(strings.TrimSuffix(entry.Report, ".json") + entrySuffix)
		if json.Unmarshal(b, &saved); saved.RSSProfile != pm {
			t.Errorf("the entry kept on disk has rssProfile %q, want %q", saved.RSSProfile, pm)
		}
	}

	op, err := pprofout.ReadFile(pm)
	if err != nil {
		t.Fatal(err)
	}
	top, err := pprofout.Top(op, pprofout.RSSSpace, 1)
	if err != nil || len(top) == 0 {
		t.Fatalf("post-mortem top: %v", err)
	}
	t.Logf("RSS post-mortem %s: top %s %.1f MiB (limit %d MiB)", filepath.Base(pm), strings.Join(top[0].Frames[:min(2, len(top[0].Frames))], " < "), float64(top[0].Value)/(1<<20), oomLimit>>20)
	found := false
	for _, f := range top[0].Frames {
		if strings.HasPrefix(f, "agent_oom_grow") {
			found = true
		}
	}
	if !found || float64(top[0].Value) < 0.5*oomLimit {
		t.Errorf("post-mortem top stack %v %d bytes, want agent_oom_grow holding most of %d", top[0].Frames, top[0].Value, oomLimit)
	}

	// the allocation-heavy container is still followed (no budget here)
	hotFollowed := false
	for _, c := range a.RSSProfiled() {
		if c == ns+"/hot/spin" {
			hotFollowed = true
		}
	}
	if !hotFollowed {
		t.Errorf("the allocation-heavy container is no longer followed by the RSS tier")
	}
}

// rssUnder sums rss_space of the samples with fn on their stack; every
// sample must carry the namespace ns (the profile is of one container).
func rssUnder(t *testing.T, p *profile.Profile, fn, ns string) int64 {
	t.Helper()
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == pprofout.RSSSpace {
			idx = i
		}
	}
	if idx < 0 {
		t.Fatalf("profile has no %s sample type: %v", pprofout.RSSSpace, p.SampleType)
	}
	var sum int64
	for _, s := range p.Sample {
		if got := s.Label["namespace"]; len(got) != 1 || got[0] != ns {
			t.Errorf("RSS sample labels %v, want namespace %s", s.Label, ns)
			return sum
		}
		on := false
		for _, loc := range s.Location {
			for _, ln := range loc.Line {
				on = on || ln.Function != nil && ln.Function.Name == fn
			}
		}
		if on {
			sum += s.Value[idx]
		}
	}
	return sum
}

// TestLinkRSSOOM: the RSS post-mortem of a kill reaches its /oom entry
// whichever of the two OOM events (heap tier's, RSS tier's) comes first,
// and only the entry of the same kill (pid and time).
func TestLinkRSSOOM(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{DataDir: dir, MaxOOMEntries: 10, Logf: t.Logf}, rss: &rssTier{oomPending: map[int]rssOOMRef{}}}
	now := time.Now()

	// the entry first: linked in place, its file rewritten
	report := filepath.Join(dir, "oom-1.json")
	a.ooms = []OOMEntry{{Pid: 41, Time: now, Report: report}, {Pid: 42, Time: now.Add(-time.Hour), Report: report + "x"}}
	a.linkRSSOOM(41, now.Add(time.Second), "/data/oom/41.rss.pb.gz")
	if a.ooms[0].RSSProfile != "/data/oom/41.rss.pb.gz" {
		t.Errorf("entry of pid 41: rssProfile %q", a.ooms[0].RSSProfile)
	}
	var saved OOMEntry
	b, err := os.ReadFile(filepath.Join(dir, "oom-1"+entrySuffix))
	if err != nil || json.Unmarshal(b, &saved) != nil || saved.RSSProfile != "/data/oom/41.rss.pb.gz" {
		t.Errorf("entry file after the link: %s %v", b, err)
	}

	// pid 42's entry is an hour old: another kill; the path waits
	a.linkRSSOOM(42, now, "/data/oom/42.rss.pb.gz")
	if a.ooms[1].RSSProfile != "" {
		t.Errorf("an hour-old entry of the same pid took the post-mortem")
	}
	if got := a.takeRSSOOM(42, now.Add(-2*time.Minute)); got != "" {
		t.Errorf("a kill 2 minutes apart took %q", got)
	}
	if got := a.takeRSSOOM(42, now.Add(2*time.Second)); got != "/data/oom/42.rss.pb.gz" {
		t.Errorf("the entry made after the RSS post-mortem took %q", got)
	}
	if got := a.takeRSSOOM(42, now); got != "" {
		t.Errorf("the post-mortem was taken twice: %q", got)
	}

	// bounded
	for pid := 1000; pid < 1000+3*maxPendingRSSOOMs; pid++ {
		a.linkRSSOOM(pid, now, "p")
	}
	if n := len(a.rss.oomPending); n > maxPendingRSSOOMs {
		t.Errorf("%d pending RSS post-mortems, cap %d", n, maxPendingRSSOOMs)
	}
}
