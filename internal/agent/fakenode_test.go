package agent

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// nodeFixture is a node as podfind sees it, made of files and a socket, so
// the agent's discovery runs for real without root: a cgroup v1 memory
// tree of plain directories (kubelet cgroupfs layout, cgroup.procs files),
// the kubelet's pod log tree, an empty /proc, and a CRI runtime (fakeCRI,
// real gRPC on a unix socket) that names the containers and gives the
// pods' annotations.
type nodeFixture struct {
	t     *testing.T
	paths podfind.Paths
	cri   *fakeCRI
	uids  map[string]string // "ns/pod" -> pod uid
}

// fixtureContainer is one container of a nodeFixture.
type fixtureContainer struct {
	ns, pod, name, uid, id string
	dir                    string // its memory cgroup directory
}

func (c *fixtureContainer) labels() labelSet { return labelSet{c.ns, c.pod, c.name} }

func newNodeFixture(t *testing.T) *nodeFixture {
	t.Helper()
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "memory", "memory.usage_in_bytes"), "0\n")
	f := &nodeFixture{t: t, uids: map[string]string{}, cri: startFakeCRI(t)}
	f.paths = podfind.Paths{CgroupRoot: root, ProcRoot: t.TempDir(), PodLogs: t.TempDir(), CRISockets: []string{f.cri.socket}}
	return f
}

// add creates a container of pod ns/pod (the pod is created on first use)
// holding pids, and names it in the pod logs and in CRI.
func (f *nodeFixture) add(ns, pod, name string, pids ...int) *fixtureContainer {
	f.t.Helper()
	uid := f.uids[ns+"/"+pod]
	if uid == "" {
		uid = newUID()
		f.uids[ns+"/"+pod] = uid
	}
	c := &fixtureContainer{ns: ns, pod: pod, name: name, uid: uid, id: kube.NewID()}
	c.dir = filepath.Join(f.paths.CgroupRoot, "memory", "kubepods", "burstable", "pod"+uid, c.id)
	var procs strings.Builder
	for _, p := range pids {
		procs.WriteString(strconv.Itoa(p) + "\n")
	}
	writeFile(f.t, filepath.Join(c.dir, "cgroup.procs"), procs.String())
	logDir := filepath.Join(f.paths.PodLogs, ns+"_"+pod+"_"+uid, name)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Symlink("/var/lib/docker/containers/"+c.id+"/"+c.id+"-json.log", filepath.Join(logDir, "0.log")); err != nil {
		f.t.Fatal(err)
	}
	f.cri.add(c)
	return c
}

// remove makes the container go: its cgroup and its CRI entry.
func (f *nodeFixture) remove(c *fixtureContainer) {
	f.t.Helper()
	if err := os.RemoveAll(c.dir); err != nil {
		f.t.Fatal(err)
	}
	f.cri.mu.Lock()
	delete(f.cri.containers, c.id)
	f.cri.mu.Unlock()
}

// annotate sets the memprof.io/profile annotation of a pod ("" removes it).
func (f *nodeFixture) annotate(ns, pod, value string) {
	f.cri.mu.Lock()
	defer f.cri.mu.Unlock()
	sb := f.cri.sandboxes[f.uids[ns+"/"+pod]]
	sb.Annotations = map[string]string{}
	if value != "" {
		sb.Annotations[AnnotationProfile] = value
	}
}

// fakeCRI serves the three runtime.v1 calls podfind makes.
type fakeCRI struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	socket     string
	mu         sync.Mutex
	sandboxes  map[string]*runtimeapi.PodSandbox // by pod uid
	containers map[string]*runtimeapi.Container  // by container id
}

func startFakeCRI(t *testing.T) *fakeCRI {
	t.Helper()
	f := &fakeCRI{socket: filepath.Join(t.TempDir(), "cri.sock"), sandboxes: map[string]*runtimeapi.PodSandbox{}, containers: map[string]*runtimeapi.Container{}}
	ln, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, f)
	go func() { _ = srv.Serve(ln) }() // ends with Stop
	t.Cleanup(srv.Stop)
	return f
}

func (f *fakeCRI) add(c *fixtureContainer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	sb := f.sandboxes[c.uid]
	if sb == nil {
		sb = &runtimeapi.PodSandbox{Id: kube.NewID(), Metadata: &runtimeapi.PodSandboxMetadata{Name: c.pod, Namespace: c.ns, Uid: c.uid}, Annotations: map[string]string{}}
		f.sandboxes[c.uid] = sb
	}
	f.containers[c.id] = &runtimeapi.Container{Id: c.id, PodSandboxId: sb.Id, Metadata: &runtimeapi.ContainerMetadata{Name: c.name},
		Labels: map[string]string{podfind.LabelContainerName: c.name, podfind.LabelPodName: c.pod, podfind.LabelPodNamespace: c.ns, podfind.LabelPodUID: c.uid}}
}

func (f *fakeCRI) Version(context.Context, *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	return &runtimeapi.VersionResponse{RuntimeName: "fakecri", RuntimeVersion: "1.0", RuntimeApiVersion: "v1"}, nil
}

func (f *fakeCRI) ListPodSandbox(context.Context, *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &runtimeapi.ListPodSandboxResponse{}
	for _, sb := range f.sandboxes {
		ann := map[string]string{}
		for k, v := range sb.Annotations {
			ann[k] = v
		}
		out.Items = append(out.Items, &runtimeapi.PodSandbox{Id: sb.Id, Metadata: sb.Metadata, Annotations: ann})
	}
	return out, nil
}

func (f *fakeCRI) ListContainers(context.Context, *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &runtimeapi.ListContainersResponse{}
	for _, c := range f.containers {
		out.Containers = append(out.Containers, c)
	}
	return out, nil
}

// logLines collects the agent's log records as text lines (and logs them
// to the test).
type logLines struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logf(format string, args ...any) {
	line := strings.TrimSpace(fmt.Sprintf(format, args...))
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	l.t.Log(line)
}

// with returns the lines holding every one of parts.
func (l *logLines) with(parts ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
next:
	for _, line := range l.lines {
		for _, p := range parts {
			if !strings.Contains(line, p) {
				continue next
			}
		}
		out = append(out, line)
	}
	return out
}

// newFakeAgent makes an agent (New: token, data directory, port on
// 127.0.0.1) whose sessions are fakes instead of Run's real ones: the heap
// session always, the RSS tier when withRSS is true.
func newFakeAgent(t *testing.T, cfg Config, withRSS bool) (*Agent, *fakeHeap, *fakeRSS, *logLines) {
	t.Helper()
	if cfg.TokenFile == "" {
		cfg.TokenFile = filepath.Join(t.TempDir(), "token")
		writeFile(t, cfg.TokenFile, randHex(32)+"\n")
	}
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	cfg.Listen = "127.0.0.1:0"
	if cfg.NodeName == "" {
		cfg.NodeName = "n1"
	}
	logs := &logLines{t: t}
	cfg.Logf = logs.logf
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.ln.Close() })
	h := newFakeHeap()
	a.s = h
	a.lastTick = time.Now()
	var r *fakeRSS
	if withRSS {
		r = newFakeRSS()
		a.setRSS(r)
	}
	return a, h, r, logs
}

// scrapeText returns the agent's /metrics exposition text.
func scrapeText(t *testing.T, a *Agent) string {
	t.Helper()
	srv := httptest.NewServer(a.metricsHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	if _, err := io.Copy(&b, resp.Body); err != nil {
		t.Fatal(err)
	}
	return b.String()
}
