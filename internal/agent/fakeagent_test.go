package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/heap"
	"github.com/memprof/memprof/internal/oom"
	"github.com/memprof/memprof/internal/recorder"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/pprofout"
)

// The agent's logic on fake sessions (fake_test.go) and a node made of
// files (fakenode_test.go): no root, no BPF; these run in make test-unit.

// Pids of processes that do not exist (above the kernel's PID_MAX_LIMIT,
// 4194304), for fixture cgroups.
const (
	ghostPid1 = 5000001
	ghostPid2 = 5000002
)

func sortedStrings(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}

func profiledNames(a *Agent) []string {
	var out []string
	for _, c := range a.Containers() {
		out = append(out, c.Namespace+"/"+c.Pod+"/"+c.Container)
	}
	return out
}

func followedDirs(r *fakeRSS) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for d := range r.followed {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// TestDiscoverySelection: discovery on a node of six containers (names and
// annotations from CRI) attaches the heap tier to exactly the selected ones
// (namespace, annotation "true", annotation "false" and an excluded
// namespace winning), the RSS tier to all of them; when a container goes
// and annotations change, the next discovery detaches and attaches
// accordingly, logging why; a failed discovery changes nothing and is
// counted.
func TestDiscoverySelection(t *testing.T) {
	node := newNodeFixture(t)
	app := node.add("shop", "web", "app", ghostPid1)
	side := node.add("shop", "web", "sidecar", ghostPid2)
	pg := node.add("other", "db", "pg")
	dns := node.add("kube-system", "dns", "coredns")
	api := node.add("other", "api", "srv")
	job := node.add("shop", "batch", "job")
	node.annotate("kube-system", "dns", "true")
	node.annotate("other", "api", "true")
	node.annotate("shop", "batch", "false")

	a, h, r, logs := newFakeAgent(t, Config{Paths: node.paths, Namespaces: []string{"shop"}, ExcludeNamespaces: []string{"kube-system"}}, true)
	ctx := context.Background()
	a.discover(ctx)

	if got, want := sortedStrings(h.added), sortedStrings([]string{app.dir, side.dir, api.dir}); !reflect.DeepEqual(got, want) {
		t.Errorf("heap tier attached to %v, want %v (app, sidecar, annotated api)", got, want)
	}
	if got, want := profiledNames(a), []string{"other/api/srv", "shop/web/app", "shop/web/sidecar"}; !reflect.DeepEqual(got, want) {
		t.Errorf("profiled %v, want %v", got, want)
	}
	if got, want := followedDirs(r), sortedStrings([]string{app.dir, side.dir, pg.dir, dns.dir, api.dir, job.dir}); !reflect.DeepEqual(got, want) {
		t.Errorf("RSS tier follows %v, want every container %v", got, want)
	}
	// The attach listed the new containers' processes; a process that
	// joins a known container later is told to both tiers at the next
	// discovery (a rescan of that cgroup, not of every one).
	if len(r.changed)+len(h.changed) != 0 {
		t.Errorf("rescans asked at the first discovery: RSS %v, heap %v; want none", r.changed, h.changed)
	}
	writeFile(t, filepath.Join(app.dir, "cgroup.procs"), fmt.Sprintf("%d\n%d\n", ghostPid1, ghostPid2+100))
	a.discover(ctx)
	if want := []string{app.dir}; !reflect.DeepEqual(r.changed, want) || !reflect.DeepEqual(h.changed, want) {
		t.Errorf("a new process in app: rescans asked RSS %v, heap %v; want %v for both", r.changed, h.changed, want)
	}
	for _, c := range a.Containers() {
		if c.Namespace == "shop" && c.Container == "app" {
			if c.Cgroup != app.dir || c.ID != app.id {
				t.Errorf("app: cgroup %s id %s, want %s %s", c.Cgroup, c.ID, app.dir, app.id)
			}
		}
	}
	a.mu.Lock()
	if k := a.known[app.id]; k == nil || k.memcg == 0 || k.labels != app.labels() {
		t.Errorf("known container app: %+v, want its memcg id (inode) and labels %v", k, app.labels())
	}
	nKnown := len(a.known)
	a.mu.Unlock()
	if nKnown != 6 {
		t.Errorf("%d containers known, want 6", nKnown)
	}
	if got := logs.with(`msg="profiling container" namespace=other pod=api container=srv cgroup=` + api.dir); len(got) != 1 {
		t.Errorf("log records of the attach to api: %q", got)
	}

	// the sidecar goes; pod web turns off by annotation, pod batch on
	node.remove(side)
	node.annotate("shop", "web", "false")
	node.annotate("shop", "batch", "true")
	a.discover(ctx)
	if got, want := sortedStrings(h.removed), sortedStrings([]string{app.dir, side.dir}); !reflect.DeepEqual(got, want) {
		t.Errorf("heap tier detached from %v, want %v", got, want)
	}
	if len(h.added) != 4 || h.added[3] != job.dir {
		t.Errorf("attaches %v, want the batch job's %s added", h.added, job.dir)
	}
	if got, want := profiledNames(a), []string{"other/api/srv", "shop/batch/job"}; !reflect.DeepEqual(got, want) {
		t.Errorf("profiled %v, want %v", got, want)
	}
	if got, want := followedDirs(r), sortedStrings([]string{app.dir, pg.dir, dns.dir, api.dir, job.dir}); !reflect.DeepEqual(got, want) {
		t.Errorf("RSS tier follows %v, want %v (sidecar gone)", got, want)
	}
	a.mu.Lock()
	_, gone := a.gone[side.labels()]
	a.mu.Unlock()
	if !gone {
		t.Errorf("the sidecar is not listed as gone (its counters would never be dropped)")
	}
	if got := logs.with(`msg="stopped profiling container" namespace=shop pod=web container=sidecar`, `why="container gone"`); len(got) != 1 {
		t.Errorf("log records of the sidecar's detach: %q", got)
	}
	if got := logs.with(`msg="stopped profiling container" namespace=shop pod=web container=app`, `why="no longer selected"`); len(got) != 1 {
		t.Errorf("log records of app's detach: %q", got)
	}

	// discovery fails (the cgroup tree is gone): nothing changes, counted
	if err := os.RemoveAll(node.paths.CgroupRoot); err != nil {
		t.Fatal(err)
	}
	a.discover(ctx)
	a.discover(ctx)
	if len(h.removed) != 2 || len(profiledNames(a)) != 2 {
		t.Errorf("after a failed discovery: detached %v, profiled %v; want no change", h.removed, profiledNames(a))
	}
	if v, ok := metric(scrapeText(t, a), MetricDiscoveryErrs, nil); !ok || v != 2 {
		t.Errorf("%s = %v (%t), want 2", MetricDiscoveryErrs, v, ok)
	}
	if got := logs.with(`level=ERROR msg="pod discovery failed"`); len(got) != 1 {
		t.Errorf("a repeated discovery failure logged %d times, want once: %q", len(got), got)
	}
}

// TestCollectBudget: collection maps the session's buckets to containers by
// the processes of their cgroups (live and allocated bytes unsampled at
// sample rate 1, exactly), and the budget detaches the process above
// --max-calls-per-second (1500 calls/s against 1000) but not the one below
// (900/s), counts and reports it, and does not detach it twice.
func TestCollectBudget(t *testing.T) {
	node := newNodeFixture(t)
	me := os.Getpid() // alive: a detached process that lives stays listed
	node.add("shop", "web", "app", me, ghostPid1)
	a, h, _, logs := newFakeAgent(t, Config{Paths: node.paths, Namespaces: []string{"shop"}, MaxCallsPerSecond: 1000, SampleRate: 1}, false)
	ctx := context.Background()
	a.discover(ctx)

	h.mu.Lock()
	h.targets = map[int]string{me: "hot", ghostPid1: "calm"}
	h.calls = map[uint32]uint64{uint32(me): 1000, ghostPid1: 1000}
	h.counters.Calls = 10000
	h.snap.Buckets = []heap.Bucket{
		{Key: heap.Key{Pid: uint32(me), StackID: 1, Size: 4096}, AllocCount: 10, InuseCount: 6},
		{Key: heap.Key{Pid: ghostPid1, StackID: 2, Size: 100}, AllocCount: 3, InuseCount: 2},
		{Key: heap.Key{Pid: 77, StackID: 3, Size: 1 << 20}, AllocCount: 9, InuseCount: 9}, // outside the container
	}
	h.mu.Unlock()
	collectAfter := func(d time.Duration) {
		a.mu.Lock()
		a.lastTick = time.Now().Add(-d)
		a.lastBudget = a.lastTick
		a.mu.Unlock()
		a.collect(ctx)
	}
	collectAfter(2 * time.Second)
	const live, alloc = 6*4096 + 2*100, 10*4096 + 3*100
	cs := a.Containers()
	if len(cs) != 1 || cs[0].LiveHeap != live || cs[0].Processes != 2 || !reflect.DeepEqual(cs[0].Pids, []int{me, ghostPid1}) {
		t.Fatalf("containers %+v, want app with live heap %d bytes, 2 processes, pids [%d %d]", cs, live, me, ghostPid1)
	}
	if len(h.excluded) != 0 {
		t.Errorf("detached %v at the first collection (no rate yet)", h.excluded)
	}

	// 2 s later: 3000 calls (1500/s) and 1800 calls (900/s)
	h.mu.Lock()
	h.calls = map[uint32]uint64{uint32(me): 4000, ghostPid1: 2800}
	h.counters.Calls = 16000
	h.mu.Unlock()
	collectAfter(2 * time.Second)
	want := map[int]string{me: "above the budget of 1000 allocator calls/s"}
	if !reflect.DeepEqual(h.excluded, want) {
		t.Errorf("detached %v, want %v", h.excluded, want)
	}
	if cs := a.Containers(); len(cs) != 1 || !reflect.DeepEqual(cs[0].Detached, []int{me}) {
		t.Errorf("containers %+v, want app listing %d as detached by the budget", cs, me)
	}
	text := scrapeText(t, a)
	l := map[string]string{"namespace": "shop", "pod": "web", "container": "app", "node": "n1"}
	for name, want := range map[string]float64{MetricBudgetCont: 1, MetricLiveHeap: live, MetricAllocTotal: alloc, MetricProcesses: 2} {
		if v, ok := metric(text, name, l); !ok || v != want {
			t.Errorf("%s{pod=web} = %v (%t), want %v", name, v, ok, want)
		}
	}
	if v, ok := metric(text, MetricBudgetTotal, nil); !ok || v != 1 {
		t.Errorf("%s = %v (%t), want 1", MetricBudgetTotal, v, ok)
	}
	// 6000 probe hits in ~2 s (the collection's own time added)
	if v, ok := metric(text, MetricProbeRate, nil); !ok || v > 3000 || v < 2900 {
		t.Errorf("%s = %v (%t), want 3000 (-3%%)", MetricProbeRate, v, ok)
	}
	// 3000 calls over 2 s and the few µs of the collection: 1499 calls/s
	if got := logs.with("level=WARN", "overhead budget", "pid="+strconv.Itoa(me)+" calls_per_second=149", "budget=1000"); len(got) != 1 {
		t.Errorf("budget log records %q", got)
	}

	// the same rates again: nothing more is detached
	h.mu.Lock()
	h.calls = map[uint32]uint64{uint32(me): 7000, ghostPid1: 4600}
	h.mu.Unlock()
	collectAfter(2 * time.Second)
	if v, _ := metric(scrapeText(t, a), MetricBudgetTotal, nil); v != 1 || len(h.excluded) != 1 {
		t.Errorf("after a third collection: %s = %v, detached %v; want 1", MetricBudgetTotal, v, h.excluded)
	}
}

// oomKill is the kill of pid in memcg at, with a heap profile of live
// blocks of size bytes when the victim was a target.
func oomKill(at time.Time, pid int, comm string, memcg uint64, target bool, live, size uint64) *recorder.OOMKill {
	k := &recorder.OOMKill{Victim: oom.Victim{Time: at, Pid: pid, Comm: comm, MemcgID: memcg, CgroupID: 1, AnonRSS: 64 << 20}, Target: target}
	if target {
		loc := &pprofout.Location{Addr: 0x1000, Lines: []pprofout.Line{{Function: "leak_fn"}}}
		k.Profile = &pprofout.Profile{SampleRate: 1, Start: at.Add(-time.Minute), Duration: time.Minute, Samples: []pprofout.Sample{
			{Stack: []*pprofout.Location{loc}, Size: size, AllocCount: live + 1, InuseCount: live, Labels: map[string]string{"pid": strconv.Itoa(pid)}},
		}}
	}
	return k
}

// TestOnOOM: an OOM kill of a profiled process writes its post-mortem under
// oom/ with the known file names, labels the heap profile with its
// container, links the RSS post-mortem that came first, lists the entry
// (also after a restart) and counts it; a kill outside every container is
// listed without labels or profile; beyond MaxOOMEntries the oldest entry
// goes with all its files.
func TestOnOOM(t *testing.T) {
	node := newNodeFixture(t)
	app := node.add("shop", "web", "app", ghostPid1)
	dataDir := t.TempDir()
	cfg := Config{Paths: node.paths, Namespaces: []string{"shop"}, MaxOOMEntries: 2, DataDir: dataDir}
	a, _, _, logs := newFakeAgent(t, cfg, true)
	a.discover(context.Background())
	a.mu.Lock()
	memcg := a.known[app.id].memcg
	a.mu.Unlock()
	oomDir := filepath.Join(dataDir, "oom")

	// the RSS session's post-mortem of the kill comes first
	t0 := time.Date(2026, 11, 30, 6, 0, 0, 0, time.UTC)
	rssPath := filepath.Join(oomDir, "oom-20261130T060000-leaky-5000001.rss.pb.gz")
	writeFile(t, rssPath, "rss")
	a.linkRSSOOM(ghostPid1, t0.Add(time.Second), rssPath)

	a.onOOM(oomKill(t0, ghostPid1, "leaky", memcg, true, 3, 1<<20))
	base := filepath.Join(oomDir, "oom-20261130T060000-leaky-5000001")
	es := a.OOMs()
	if len(es) != 1 {
		t.Fatalf("%d OOM entries, want 1", len(es))
	}
	e := es[0]
	want := OOMEntry{Time: t0, Namespace: "shop", Pod: "web", Container: "app", Node: "n1", Pid: ghostPid1, Comm: "leaky", Profiled: true,
		Kind: oom.KindHost, Profile: base + ".pb.gz", RSSProfile: rssPath, Report: base + ".json", Text: base + ".txt"}
	got := e
	got.Details = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("entry\n %+v\nwant\n %+v", got, want)
	}
	// the heap profile: labelled with the container, 3 MiB live at the kill
	f, err := os.Open(e.Profile)
	if err != nil {
		t.Fatal(err)
	}
	p, err := profile.Parse(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	inuse := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			inuse = i
		}
	}
	if len(p.Sample) != 1 || inuse < 0 || p.Sample[0].Value[inuse] != 3<<20 {
		t.Fatalf("post-mortem profile samples %v (types %v), want one of inuse_space 3 MiB", p.Sample, p.SampleType)
	}
	for k, v := range map[string]string{"namespace": "shop", "pod": "web", "container": "app", "node": "n1", "pid": "5000001"} {
		if got := p.Sample[0].Label[k]; len(got) != 1 || got[0] != v {
			t.Errorf("post-mortem sample label %s = %v, want %q", k, got, v)
		}
	}
	// the entry on disk, for a restart
	var onDisk OOMEntry
	if b, err := os.ReadFile(base + entrySuffix); err != nil || json.Unmarshal(b, &onDisk) != nil || onDisk.Pod != "web" || onDisk.RSSProfile != rssPath {
		t.Errorf("entry file %s: %+v, %v", base+entrySuffix, onDisk, err)
	}
	if got := logs.with("level=WARN", "pid=5000001", "comm=leaky", "namespace=shop", "pod=web", "container=app", "profiled=true"); len(got) != 1 {
		t.Errorf("log records of the kill: %q", got)
	}

	// a kill outside the containers, not profiled
	t1 := t0.Add(time.Minute)
	a.onOOM(oomKill(t1, ghostPid2, "other", 999999999, false, 0, 0))
	es = a.OOMs()
	if len(es) != 2 || es[1].Namespace != "" || es[1].Profiled || es[1].Profile != "" || es[1].Report != filepath.Join(oomDir, "oom-20261130T060100-other-5000002.json") {
		t.Errorf("entry of the kill outside: %+v", es[len(es)-1])
	}
	text := scrapeText(t, a)
	if v, ok := metric(text, MetricOOMKills, map[string]string{"pod": "web"}); !ok || v != 1 {
		t.Errorf("%s{pod=web} = %v (%t), want 1", MetricOOMKills, v, ok)
	}
	for prof, want := range map[string]float64{"true": 1, "false": 1} {
		if v, ok := metric(text, MetricOOMTotal, map[string]string{"profiled": prof}); !ok || v != want {
			t.Errorf("%s{profiled=%s} = %v (%t), want %v", MetricOOMTotal, prof, v, ok, want)
		}
	}

	// a third kill: the first entry goes, with every file of it
	a.onOOM(oomKill(t0.Add(2*time.Minute), ghostPid1, "leaky", memcg, true, 1, 4096))
	es = a.OOMs()
	if len(es) != 2 || es[0].Pid != ghostPid2 || !es[1].Time.Equal(t0.Add(2*time.Minute)) {
		t.Errorf("entries after a third kill: %+v, want the last two", es)
	}
	for _, p := range []string{base + ".pb.gz", base + ".json", base + ".txt", base + entrySuffix, rssPath} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s of the dropped entry kept", filepath.Base(p))
		}
	}
	left, _ := filepath.Glob(filepath.Join(oomDir, "*"))
	if len(left) != 7 { // 2 reports (json, txt, entry) + the third kill's profile
		t.Errorf("oom/ holds %d files, want 7: %v", len(left), left)
	}

	// a restart lists the same entries
	b, _, _, _ := newFakeAgent(t, cfg, false)
	re := b.OOMs()
	if len(re) != 2 || re[0].Pid != ghostPid2 || re[1].Pod != "web" || re[1].Profile != es[1].Profile {
		t.Errorf("after a restart: %+v, want %+v", re, es)
	}
}

// TestSaveProfilesRetention: each profiled container's heap profile is kept
// under profiles/<ns>_<pod>_<container>/<UTC time>.pb.gz, labelled, with
// the values the session gave; the exited processes it holds are released
// with the mark of that profile; a container without samples gets no file
// (its exited processes still released); two saves in one second make two
// files; files older than the retention, and directories left empty, go.
func TestSaveProfilesRetention(t *testing.T) {
	node := newNodeFixture(t)
	app := node.add("shop", "web", "app", ghostPid1)
	idle := node.add("shop", "web", "idle", ghostPid2)
	a, h, _, _ := newFakeAgent(t, Config{Paths: node.paths, Namespaces: []string{"shop"}, Retention: time.Hour}, false)
	a.discover(context.Background())

	loc := &pprofout.Location{Addr: 0x1000, Lines: []pprofout.Line{{Function: "leak_fn"}}}
	h.mu.Lock()
	h.profiles[app.dir] = &pprofout.Profile{SampleRate: 1, Start: time.Now(), Duration: time.Minute, Samples: []pprofout.Sample{
		{Stack: []*pprofout.Location{loc}, Size: 1000, AllocCount: 7, InuseCount: 5, Labels: map[string]string{"pid": "5000001"}},
	}}
	h.marks[app.dir], h.marks[idle.dir] = 42, 9
	h.mu.Unlock()

	profiles := filepath.Join(a.cfg.DataDir, "profiles")
	old := filepath.Join(profiles, "shop_web_app", "20200101T000000Z.pb.gz")
	gone := filepath.Join(profiles, "shop_gone_c", "20200101T000000Z.pb.gz")
	for _, p := range []string{old, gone} {
		writeFile(t, p, "x")
		past := time.Now().Add(-2 * time.Hour)
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now().UTC().Truncate(time.Second)
	a.saveProfiles(context.Background())
	a.saveProfiles(context.Background())

	files, _ := filepath.Glob(filepath.Join(profiles, "shop_web_app", "*"))
	name := regexp.MustCompile(`^\d{8}T\d{6}Z\.pb\.gz$`)
	if len(files) != 2 {
		t.Fatalf("profiles/shop_web_app holds %v, want 2 new profiles (the old one removed)", files)
	}
	for _, f := range files {
		ts, err := time.Parse("20060102T150405Z.pb.gz", filepath.Base(f))
		if !name.MatchString(filepath.Base(f)) || err != nil || ts.Before(start) || ts.After(start.Add(3*time.Second)) {
			t.Errorf("profile file %s: not named by the UTC time of the save (%s)", filepath.Base(f), start.Format("20060102T150405Z"))
		}
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		p, err := profile.Parse(fh)
		fh.Close()
		if err != nil {
			t.Fatal(err)
		}
		vals := map[string]int64{}
		for i, st := range p.SampleType {
			for _, s := range p.Sample {
				vals[st.Type] += s.Value[i]
			}
		}
		if want := map[string]int64{"alloc_objects": 7, "alloc_space": 7000, "inuse_objects": 5, "inuse_space": 5000}; !reflect.DeepEqual(vals, want) {
			t.Errorf("%s: values %v, want %v", filepath.Base(f), vals, want)
		}
		for k, v := range map[string]string{"namespace": "shop", "pod": "web", "container": "app", "node": "n1"} {
			if got := p.Sample[0].Label[k]; len(got) != 1 || got[0] != v {
				t.Errorf("%s: label %s = %v, want %q", filepath.Base(f), k, got, v)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(profiles, "shop_web_idle")); err == nil {
		t.Errorf("a profile directory was made for the container without samples")
	}
	if _, err := os.Stat(filepath.Dir(gone)); err == nil {
		t.Errorf("a directory holding only profiles older than the retention was kept")
	}
	h.mu.Lock()
	released := map[string]uint64{}
	for d, m := range h.released {
		released[d] = m
	}
	h.mu.Unlock()
	if want := map[string]uint64{app.dir: 42, idle.dir: 9}; !reflect.DeepEqual(released, want) {
		t.Errorf("exited processes released %v, want %v", released, want)
	}
	if v, ok := metric(scrapeText(t, a), MetricSaved, nil); !ok || v != 2 {
		t.Errorf("%s = %v (%t), want 2", MetricSaved, v, ok)
	}
	if got := strings.Join(sortedStrings([]string{filepath.Base(files[0]), filepath.Base(files[1])}), " "); files[0] == files[1] {
		t.Errorf("two saves wrote one file: %s", got)
	}
}

// TestSaveRSSProfiles: the RSS tier keeps one RSS profile per container
// (profiles/<ns>_<pod>_<container>/<UTC time>.rss.pb.gz) holding only the
// container's processes, labelled, with the session's values, and exports
// the container's figures (profiled, before, faulted, by region).
func TestSaveRSSProfiles(t *testing.T) {
	node := newNodeFixture(t)
	node.add("shop", "web", "app", ghostPid1)
	node.add("other", "db", "pg", ghostPid2)
	a, _, r, _ := newFakeAgent(t, Config{Paths: node.paths}, true)
	a.discover(context.Background())
	loc := &pprofout.Location{Addr: 0x1000, Lines: []pprofout.Line{{Function: "fault_fn"}}}
	stack := []*pprofout.Location{loc}
	r.mu.Lock()
	r.samples = []pprofout.RSSSample{
		{Stack: stack, Size: 4096, Faulted: 10, Resident: 6, Labels: map[string]string{"pid": "5000001"}},
		{Stack: stack, Size: 2 << 20, Faulted: 1, Resident: 1, Labels: map[string]string{"pid": "5000002"}},
		{Stack: stack, Size: 4096, Faulted: 99, Resident: 99, Labels: map[string]string{"pid": "77"}}, // in no container
	}
	r.sums = []rss.ProcSummary{
		{Pid: ghostPid1, Attributed: 6 * 4096, Before: 1000, Faulted: 10 * 4096, Regions: rss.Regions{Brk: 8192, Anon: 16384}},
		{Pid: ghostPid2, Attributed: 2 << 20, Faulted: 2 << 20, Regions: rss.Regions{Anon: 2 << 20}},
		{Pid: 77, Attributed: 1 << 30},
	}
	r.mu.Unlock()
	a.saveRSSProfiles(context.Background())

	profiles := filepath.Join(a.cfg.DataDir, "profiles")
	for dir, want := range map[string]map[string]int64{
		"shop_web_app": {"faulted_objects": 10, "faulted_space": 40960, "rss_space": 24576},
		"other_db_pg":  {"faulted_objects": 1, "faulted_space": 2 << 20, "rss_space": 2 << 20},
	} {
		files, _ := filepath.Glob(filepath.Join(profiles, dir, "*"))
		if len(files) != 1 || !regexp.MustCompile(`^\d{8}T\d{6}Z\.rss\.pb\.gz$`).MatchString(filepath.Base(files[0])) {
			t.Errorf("profiles/%s holds %v, want one <UTC time>.rss.pb.gz", dir, files)
			continue
		}
		fh, err := os.Open(files[0])
		if err != nil {
			t.Fatal(err)
		}
		p, err := profile.Parse(fh)
		fh.Close()
		if err != nil {
			t.Fatal(err)
		}
		vals := map[string]int64{}
		for i, st := range p.SampleType {
			for _, s := range p.Sample {
				vals[st.Type] += s.Value[i]
			}
		}
		if !reflect.DeepEqual(vals, want) {
			t.Errorf("%s: values %v, want %v", dir, vals, want)
		}
		parts := strings.Split(dir, "_")
		for k, v := range map[string]string{"namespace": parts[0], "pod": parts[1], "container": parts[2], "node": "n1"} {
			if got := p.Sample[0].Label[k]; len(got) != 1 || got[0] != v {
				t.Errorf("%s: label %s = %v, want %q", dir, k, got, v)
			}
		}
	}
	text := scrapeText(t, a)
	web := map[string]string{"namespace": "shop", "pod": "web", "container": "app", "node": "n1"}
	for name, want := range map[string]float64{MetricRSSSampled: 24576, MetricRSSBefore: 1000, MetricRSSFaulted: 40960} {
		if v, ok := metric(text, name, web); !ok || v != want {
			t.Errorf("%s{pod=web} = %v (%t), want %v", name, v, ok, want)
		}
	}
	for region, want := range map[string]float64{"brk": 8192, "anon": 16384, "stack": 0} {
		if v, ok := metric(text, MetricRSSRegion, map[string]string{"pod": "web", "region": region}); !ok || v != want {
			t.Errorf("%s{pod=web,region=%s} = %v (%t), want %v", MetricRSSRegion, region, v, ok, want)
		}
	}
	if v, ok := metric(text, MetricRSSSampled, map[string]string{"pod": "db"}); !ok || v != 2<<20 {
		t.Errorf("%s{pod=db} = %v (%t), want 2 MiB", MetricRSSSampled, v, ok)
	}
}

// TestOnOOMNewContainer: the victim of a kill is in a container that
// started after the last discovery: the agent discovers it at the kill,
// while its cgroup exists, labels the entry with it and keeps its kill
// counter an hour as for containers gone.
func TestOnOOMNewContainer(t *testing.T) {
	node := newNodeFixture(t)
	a, _, _, _ := newFakeAgent(t, Config{Paths: node.paths, Namespaces: []string{"shop"}}, false)
	a.discover(context.Background())
	late := node.add("shop", "late", "app", ghostPid2)
	memcg, err := cgroups.ID(late.dir)
	if err != nil {
		t.Fatal(err)
	}
	a.onOOM(oomKill(time.Date(2026, 11, 30, 6, 0, 0, 0, time.UTC), ghostPid2, "late", memcg, false, 0, 0))
	es := a.OOMs()
	if len(es) != 1 || es[0].Namespace != "shop" || es[0].Pod != "late" || es[0].Container != "app" || es[0].Profiled {
		t.Fatalf("entries %+v, want one of shop/late/app, not profiled", es)
	}
	a.mu.Lock()
	kills, gone := a.oomKills[late.labels()], !a.gone[late.labels()].IsZero()
	a.mu.Unlock()
	if kills != 1 || !gone {
		t.Errorf("kill counter of shop/late/app %d (kept for an hour: %t), want 1 (true)", kills, gone)
	}
}
