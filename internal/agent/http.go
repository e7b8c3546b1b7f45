package agent

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/pprof/profile"
)

// tokenFile holds the bearer token, re-read when the file changes
// (Kubernetes updates a mounted Secret by swapping a symlink).
type tokenFile struct {
	path string
	mu   sync.Mutex
	sum  [32]byte // sha256 of the token: compared in constant time
	ok   bool
	ino  uint64
	mod  time.Time
	size int64
	next time.Time // next stat
}

func openToken(path string) (*tokenFile, error) {
	if path == "" {
		return nil, fmt.Errorf("no --token-file: the profile endpoints need a bearer token (see deploy/README.md)")
	}
	t := &tokenFile{path: path}
	if err := t.reload(); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *tokenFile) reload() error {
	st, err := os.Stat(t.path)
	if err != nil {
		t.ok = false
		return fmt.Errorf("token file %s: %w (create the Secret memprof-agent-token, see deploy/README.md)", t.path, err)
	}
	b, err := os.ReadFile(t.path)
	if err != nil {
		t.ok = false
		return fmt.Errorf("read token file %s: %w", t.path, err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		t.ok = false
		return fmt.Errorf("token file %s is empty: refusing to serve profiles without a token", t.path)
	}
	t.sum = sha256.Sum256([]byte(tok))
	t.ok = true
	t.mod, t.size = st.ModTime(), st.Size()
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		t.ino = sys.Ino
	}
	return nil
}

// check reports whether the request carries the token.
func (t *tokenFile) check(r *http.Request) bool {
	t.mu.Lock()
	now := time.Now()
	if now.After(t.next) {
		t.next = now.Add(time.Second)
		st, err := os.Stat(t.path)
		changed := err != nil
		if err == nil {
			var ino uint64
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				ino = sys.Ino
			}
			changed = ino != t.ino || !st.ModTime().Equal(t.mod) || st.Size() != t.size || !t.ok
		}
		if changed {
			t.reload() // a missing or empty file locks everyone out
		}
	}
	ok, sum := t.ok, t.sum
	t.mu.Unlock()
	h := r.Header.Get("Authorization")
	const prefix = "Bearer "
	if !ok || len(h) <= len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return false
	}
	got := sha256.Sum256([]byte(strings.TrimSpace(h[len(prefix):])))
	return subtle.ConstantTimeCompare(got[:], sum[:]) == 1
}

func (a *Agent) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if !a.ready() {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", a.metricsHandler())
	mux.Handle("GET /profiles/heap", a.auth(http.HandlerFunc(a.serveHeap)))
	mux.Handle("GET /profiles", a.auth(http.HandlerFunc(a.serveList)))
	mux.Handle("GET /oom", a.auth(http.HandlerFunc(a.serveOOM)))
	mux.Handle("GET /oom/file", a.auth(http.HandlerFunc(a.serveOOMFile)))
	return mux
}

func (a *Agent) auth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.token.check(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="memprof"`)
			http.Error(w, "unauthorized: send Authorization: Bearer <token> (the token of --token-file)", http.StatusUnauthorized)
			return
		}
		if !a.ready() {
			http.Error(w, "agent starting", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// ready reports whether the recording session is up.
func (a *Agent) ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.s != nil
}

// MaxWindow caps ?seconds= of /profiles/heap.
const MaxWindow = 5 * time.Minute

func (a *Agent) serveHeap(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, pod, name := q.Get("namespace"), q.Get("pod"), q.Get("container")
	if pod == "" {
		http.Error(w, "give ?pod=NAME (and namespace=, container=); GET /profiles lists the profiled containers", http.StatusBadRequest)
		return
	}
	conts := a.find(ns, pod, name)
	if len(conts) == 0 {
		http.Error(w, fmt.Sprintf("no profiled container namespace=%q pod=%q container=%q on node %s (select pods with the annotation %s: \"true\" or --namespace; GET /profiles lists them)", ns, pod, name, a.cfg.NodeName, AnnotationProfile), http.StatusNotFound)
		return
	}
	var p *profile.Profile
	var err error
	if s := q.Get("seconds"); s != "" {
		n, perr := strconv.Atoi(s)
		if perr != nil || n <= 0 || time.Duration(n)*time.Second > MaxWindow {
			http.Error(w, fmt.Sprintf("seconds must be 1..%d", int(MaxWindow.Seconds())), http.StatusBadRequest)
			return
		}
		p, err = a.allocProfile(r.Context(), conts, time.Duration(n)*time.Second)
	} else {
		p, err = a.heapProfile(conts, nil)
	}
	if err != nil {
		http.Error(w, "build profile: "+err.Error(), http.StatusInternalServerError)
		return
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="heap-%s-%s.pb.gz"`, unsafeName.ReplaceAllString(pod, "-"), time.Now().UTC().Format("20060102T150405Z")))
	w.Write(buf.Bytes())
}

// ContainerInfo is one entry of GET /profiles.
type ContainerInfo struct {
	Namespace string    `json:"namespace"`
	Pod       string    `json:"pod"`
	Container string    `json:"container"`
	ID        string    `json:"id"`
	Cgroup    string    `json:"cgroup"`
	Since     time.Time `json:"since"`
	Pids      []int     `json:"pids"`
	Processes int       `json:"profiledProcesses"`
	LiveHeap  float64   `json:"liveHeapBytes"`
	Detached  []int     `json:"detachedByBudget,omitempty"`
}

// Containers lists the profiled containers.
func (a *Agent) Containers() []ContainerInfo {
	out := []ContainerInfo{}
	for _, c := range a.profiledList() {
		a.mu.Lock()
		ci := ContainerInfo{Namespace: c.labels.Namespace, Pod: c.labels.Pod, Container: c.labels.Container, ID: c.c.ID,
			Cgroup: c.dir, Since: c.since, Pids: append([]int(nil), c.pids...), Processes: c.procs, LiveHeap: c.live}
		for pid := range c.excluded {
			ci.Detached = append(ci.Detached, pid)
		}
		a.mu.Unlock()
		out = append(out, ci)
	}
	return out
}

func (a *Agent) serveList(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, a.Containers())
}

func (a *Agent) serveOOM(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, a.OOMs())
}

// serveOOMFile returns one file of a post-mortem: ?path= as /oom lists it.
func (a *Agent) serveOOMFile(w http.ResponseWriter, r *http.Request) {
	want := r.URL.Query().Get("path")
	for _, e := range a.OOMs() {
		for _, p := range []string{e.Profile, e.Report, e.Text} {
			if p != "" && p == want {
				http.ServeFile(w, r, p)
				return
			}
		}
	}
	http.Error(w, "no such post-mortem file (GET /oom lists them)", http.StatusNotFound)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
