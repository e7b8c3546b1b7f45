package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/agent/pyroscope"
	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/pprofout"
)

func TestTokenFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token")
	if _, err := New(Config{TokenFile: path, DataDir: dir, Listen: "127.0.0.1:0"}); err == nil {
		t.Fatalf("New with a missing token file succeeded; it must refuse to start")
	}
	writeFile(t, path, " \n")
	if _, err := New(Config{TokenFile: path, DataDir: dir, Listen: "127.0.0.1:0"}); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("New with an empty token file: %v, want a refusal naming the empty file", err)
	}
	writeFile(t, path, "s3cret\n")
	tf, err := openToken(path)
	if err != nil {
		t.Fatal(err)
	}
	req := func(h string) *http.Request {
		r := httptest.NewRequest("GET", "/oom", nil)
		if h != "" {
			r.Header.Set("Authorization", h)
		}
		return r
	}
	for h, want := range map[string]bool{"Bearer s3cret": true, "bearer s3cret": true, "Bearer s3cre": false, "Bearer s3cret2": false, "s3cret": false, "": false, "Basic s3cret": false} {
		if got := tf.check(req(h)); got != want {
			t.Errorf("Authorization %q: %t, want %t", h, got, want)
		}
	}
	// re-read on change (Kubernetes swaps the Secret's symlink)
	tmp := filepath.Join(dir, "token.new")
	writeFile(t, tmp, "rotated")
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	if tf.check(req("Bearer s3cret")) || !tf.check(req("Bearer rotated")) {
		t.Errorf("after rotation: old token accepted or new one refused")
	}
	// a file that disappears locks everyone out
	os.Remove(path)
	time.Sleep(1100 * time.Millisecond)
	if tf.check(req("Bearer rotated")) {
		t.Errorf("token accepted after the token file was removed")
	}
}

func TestSelection(t *testing.T) {
	mk := func(ns, ann string) *podfind.Container {
		c := &podfind.Container{Namespace: ns}
		if ann != "" {
			c.Annotations = map[string]string{AnnotationProfile: ann}
		}
		return c
	}
	cases := []struct {
		inc, exc []string
		c        *podfind.Container
		want     bool
	}{
		{nil, nil, mk("a", ""), false},
		{nil, nil, mk("a", "true"), true},
		{[]string{"a"}, nil, mk("a", ""), true},
		{[]string{"a"}, nil, mk("b", ""), false},
		{[]string{"a"}, nil, mk("a", "false"), false},
		{[]string{"*"}, []string{"kube-system"}, mk("kube-system", "true"), false},
		{nil, []string{"kube-system"}, mk("b", ""), true},
		{nil, []string{"kube-system"}, mk("kube-system", ""), false},
		{[]string{"*"}, nil, mk("", ""), false},
	}
	for i, c := range cases {
		a := &Agent{cfg: Config{Namespaces: c.inc, ExcludeNamespaces: c.exc}}
		if got := a.selected(c.c); got != c.want {
			t.Errorf("case %d: include %v exclude %v ns %q annotations %v: %t, want %t", i, c.inc, c.exc, c.c.Namespace, c.c.Annotations, got, c.want)
		}
	}
}

func TestPyroscopePush(t *testing.T) {
	pyro := &fakePyroscope{}
	srv := httptest.NewServer(pyro)
	defer srv.Close()
	p := &pprofout.Profile{SampleRate: 512 << 10, Start: time.Now(), Duration: time.Second}
	loc := &pprofout.Location{Addr: 0x1000, Lines: []pprofout.Line{{Function: "leaky_fn"}}}
	p.Samples = []pprofout.Sample{{Stack: []*pprofout.Location{loc}, Size: 1 << 20, AllocCount: 3, InuseCount: 2, Labels: map[string]string{"pid": "1"}}}
	var buf bytes.Buffer
	if err := pprofout.Write(&buf, p); err != nil {
		t.Fatal(err)
	}
	from, until := time.Unix(1700000000, 0), time.Unix(1700000060, 0)
	err := (&pyroscope.Pusher{URL: srv.URL}).Push(context.Background(), pyroscope.Upload{
		App:    "shop/api",
		Labels: map[string]string{"service_name": "shop/api", "namespace": "shop", "pod": "api-0", "container": "api", "node": "n1", "odd": "a,b{c}=d"},
		From:   from, Until: until, Pprof: buf.Bytes(),
	})
	if err != nil {
		t.Fatalf("Push: %v", err)
	}
	got, errs := pyro.uploads()
	if len(errs) > 0 || len(got) != 1 {
		t.Fatalf("uploads %d, errors %v", len(got), errs)
	}
	u := got[0]
	want := map[string]string{"service_name": "shop/api", "namespace": "shop", "pod": "api-0", "container": "api", "node": "n1", "odd": "a_b_c__d"}
	for k, v := range want {
		if u.labels[k] != v {
			t.Errorf("label %s = %q, want %q (all: %v)", k, u.labels[k], v, u.labels)
		}
	}
	if u.app != "shop/api" || u.from != from.Unix() || u.until != until.Unix() || u.format != "pprof" {
		t.Errorf("upload app %q from %d until %d format %q", u.app, u.from, u.until, u.format)
	}
	if len(u.prof.Sample) != 1 || u.prof.Sample[0].Location[0].Line[0].Function.Name != "leaky_fn" {
		t.Errorf("uploaded profile: %v", u.prof)
	}
	// a server error is reported
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "nope", 500) }))
	defer bad.Close()
	if err := (&pyroscope.Pusher{URL: bad.URL}).Push(context.Background(), pyroscope.Upload{App: "x", Pprof: buf.Bytes()}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("push to a failing server: %v", err)
	}
}

func TestDiffProfiles(t *testing.T) {
	loc := &pprofout.Location{Addr: 0x1000, Lines: []pprofout.Line{{Function: "f"}}}
	mk := func(alloc, inuse uint64) *profile.Profile {
		p := &pprofout.Profile{SampleRate: 1, Start: time.Now()}
		p.Samples = []pprofout.Sample{{Stack: []*pprofout.Location{loc}, Size: 100, AllocCount: alloc, InuseCount: inuse, Labels: map[string]string{"pid": "1"}}}
		b, err := pprofout.Build(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	d, err := diffProfiles(mk(10, 5), mk(25, 7), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Sample) != 1 || d.Sample[0].Value[0] != 15 || d.Sample[0].Value[1] != 1500 || d.Sample[0].Value[3] != 200 {
		t.Fatalf("diff samples %v, want alloc 15 objects / 1500 bytes, inuse +200", d.Sample[0].Value)
	}
	d, _ = diffProfiles(mk(10, 5), mk(10, 5), time.Second)
	if len(d.Sample) != 0 {
		t.Errorf("no allocation in the window: %d samples, want 0", len(d.Sample))
	}
}

// TestMetricsCollector: the agent's collector, scraped through the
// registry without a session: per-container series (containers sharing
// labels added up, label values escaped), node-wide series, the Go and
// process collectors, and no session series before Run.
func TestMetricsCollector(t *testing.T) {
	a := &Agent{cfg: Config{NodeName: "n1"}, profiled: map[string]*container{}, known: map[string]*container{},
		oomKills: map[labelSet]uint64{}, oomTotal: map[bool]uint64{}, budgetHits: map[labelSet]uint64{}}
	l := labelSet{"ns", "web", "app"}
	// RSS is read from the memory cgroup's memory.stat at scrape time
	memcg := t.TempDir()
	writeFile(t, filepath.Join(memcg, "memory.stat"), fmt.Sprintf("rss 1\ntotal_rss %d\n", 3<<20))
	a.profiled["a"] = &container{labels: l, live: 1 << 20, dir: memcg, procs: 1}
	a.profiled["b"] = &container{labels: l, live: 1 << 20, procs: 2} // restarted, old one still listed
	a.profiled["c"] = &container{labels: labelSet{"ns", `q"p`, "app"}, live: 5}
	a.oomKills[l] = 2
	a.oomTotal[false] = 3
	a.reg = newRegistry(a)
	srv := httptest.NewServer(a.metricsHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	buf.ReadFrom(resp.Body)
	resp.Body.Close()
	text := buf.String()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d\n%s", resp.StatusCode, text)
	}
	for _, line := range []string{
		"# HELP " + MetricLiveHeap + " Estimated live native heap bytes of the container (unsampled sampled live blocks).",
		"# TYPE " + MetricLiveHeap + " gauge",
		"# TYPE " + MetricAllocTotal + " counter",
		MetricLiveHeap + `{container="app",namespace="ns",node="n1",pod="web"} 2.097152e+06`,
		MetricLiveHeap + `{container="app",namespace="ns",node="n1",pod="q\"p"} 5`,
		MetricFragRatio + `{container="app",namespace="ns",node="n1",pod="web"} 1.5`,
		MetricProcesses + `{container="app",namespace="ns",node="n1",pod="web"} 3`,
		MetricOOMKills + `{container="app",namespace="ns",node="n1",pod="web"} 2`,
		MetricOOMTotal + `{profiled="false"} 3`,
		MetricOOMTotal + `{profiled="true"} 0`,
		MetricPushes + `{result="error"} 0`,
	} {
		if !strings.Contains(text, line+"\n") {
			t.Errorf("/metrics lacks the line %s", line)
		}
	}
	for _, name := range []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "go_goroutines", "go_memstats_heap_alloc_bytes"} {
		if _, ok := metric(text, name, nil); !ok {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	for _, name := range []string{MetricTargets, MetricMapEntries, MetricLost} {
		if _, ok := metric(text, name, nil); ok {
			t.Errorf("/metrics has %s before the session started", name)
		}
	}
}

func TestRetention(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{DataDir: dir, Retention: time.Hour}}
	old := filepath.Join(dir, "profiles", "ns_pod_c", "old.pb.gz")
	fresh := filepath.Join(dir, "profiles", "ns_pod_c", "new.pb.gz")
	gone := filepath.Join(dir, "profiles", "ns_gone_c", "old.pb.gz")
	for _, p := range []string{old, fresh, gone} {
		writeFile(t, p, "x")
	}
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(old, past, past)
	os.Chtimes(gone, past, past)
	a.applyRetention(time.Now())
	if _, err := os.Stat(old); err == nil {
		t.Errorf("%s older than the retention was kept", old)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("fresh profile deleted: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(gone)); err == nil {
		t.Errorf("empty container directory kept")
	}
}

// TestNewPids: discovery tells the sessions about a container only when
// its process list gained a pid (lists sorted, as podfind returns them).
func TestNewPids(t *testing.T) {
	for _, c := range []struct {
		before, now []int
		want        bool
	}{
		{nil, nil, false},
		{[]int{1, 5}, []int{1, 5}, false},
		{[]int{1, 5, 9}, []int{5}, false}, // only exits
		{nil, []int{3}, true},
		{[]int{1, 5}, []int{1, 3, 5}, true},
		{[]int{1, 5}, []int{1, 5, 7}, true},
		{[]int{4}, []int{2}, true}, // one went, another came
	} {
		if got := newPids(c.before, c.now); got != c.want {
			t.Errorf("newPids(%v, %v) = %t, want %t", c.before, c.now, got, c.want)
		}
	}
}
