package agent

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/pprof/profile"
	"golang.org/x/net/netutil"
)

// ServerLimits bounds what clients of the agent's port can hold: how long a
// connection may take to send a request, to read a response or to sit idle
// between requests, and how many connections are open at once. Zero fields
// take the defaults (DefaultServerLimits).
type ServerLimits struct {
	// ReadHeaderTimeout: time from accepting a connection (or from the end
	// of its previous request) to the end of the request headers.
	ReadHeaderTimeout time.Duration
	// ReadTimeout: time to read a whole request. Every endpoint is a GET
	// without a body, so this is ReadHeaderTimeout plus slack.
	ReadTimeout time.Duration
	// WriteTimeout: time from the end of the request headers to the end of
	// the response. /profiles/heap?seconds=N extends it by N seconds for
	// its own request (N is at most MaxWindow).
	WriteTimeout time.Duration
	// IdleTimeout: how long a keep-alive connection may wait for its next
	// request before the agent closes it.
	IdleTimeout time.Duration
	// MaxConns caps the open connections. Further connections wait in the
	// kernel's accept queue (no descriptor or memory of the agent) until
	// one closes; the timeouts above make sure one does.
	MaxConns int
}

// DefaultServerLimits are the limits of `memprof agent`. WriteTimeout covers
// building and sending a heap profile of a large pod; Prometheus scrapes
// every 15-60 s and keeps its connection, so IdleTimeout exceeds a
// typical scrape interval; 64 connections serve Prometheus, the kubelet's
// probes and a few users, at about 17 KiB each when idle (issue 8 measured
// 86 MiB for 5,000: read and write buffers and a goroutine's stack).
var DefaultServerLimits = ServerLimits{
	ReadHeaderTimeout: 10 * time.Second,
	ReadTimeout:       15 * time.Second,
	WriteTimeout:      2 * time.Minute,
	IdleTimeout:       90 * time.Second,
	MaxConns:          64,
}

func (l *ServerLimits) defaults() {
	d := DefaultServerLimits
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = d.ReadHeaderTimeout
	}
	if l.ReadTimeout <= 0 {
		l.ReadTimeout = max(d.ReadTimeout, l.ReadHeaderTimeout)
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = d.WriteTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = d.IdleTimeout
	}
	if l.MaxConns <= 0 {
		l.MaxConns = d.MaxConns
	}
}

// newServer returns the HTTP server of the agent and the listener to serve
// it on: ln capped at cfg.HTTP.MaxConns connections.
func (a *Agent) newServer(ln net.Listener) (*http.Server, net.Listener) {
	l := &a.cfg.HTTP
	l.defaults()
	srv := &http.Server{
		Handler:           a.handler(),
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		ReadTimeout:       l.ReadTimeout,
		WriteTimeout:      l.WriteTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    16 << 10, // GETs with a query string and a token
		// net/http's own messages (bad TLS hellos, accept errors) carry
		// client-sent bytes: the log's handler quotes them.
		ErrorLog: slog.NewLogLogger(a.cfg.Log.With("component", "http").Handler(), slog.LevelWarn),
	}
	return srv, netutil.LimitListener(ln, l.MaxConns)
}

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
			// A missing or empty file locks everyone out (t.ok false); the
			// error is the one New reported at start-up.
			_ = t.reload()
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
	mux.Handle("GET /profiles/rss", a.auth(http.HandlerFunc(a.serveRSS)))
	mux.Handle("GET /profiles/growth", a.auth(http.HandlerFunc(a.serveGrowth)))
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

// parseWindow parses ?seconds= of /profiles/heap: "" is no window (0),
// otherwise a decimal count of seconds in 1..MaxWindow. Larger numbers, up
// to any length, are refused before any multiplication, so none can wrap
// around to a small or negative duration.
func parseWindow(s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	maxN := int64(MaxWindow / time.Second)
	n, err := strconv.ParseInt(s, 10, 64)
	switch {
	case errors.Is(err, strconv.ErrRange) || err == nil && (n < 1 || n > maxN):
		return 0, fmt.Errorf("seconds=%q out of range: give 1..%d", s, maxN)
	case err != nil:
		return 0, fmt.Errorf("seconds=%q is not a whole number: give 1..%d", s, maxN)
	}
	return time.Duration(n) * time.Second, nil
}

func (a *Agent) serveHeap(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, pod, name := q.Get("namespace"), q.Get("pod"), q.Get("container")
	window, werr := parseWindow(q.Get("seconds"))
	if werr != nil {
		http.Error(w, werr.Error(), http.StatusBadRequest)
		return
	}
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
	if window > 0 {
		// this response comes the window later than others: extend its
		// write deadline by the window (net/http clears the read deadline
		// once the request is read, so ReadTimeout does not cut it)
		if err := http.NewResponseController(w).SetWriteDeadline(time.Now().Add(window + a.cfg.HTTP.WriteTimeout)); err != nil {
			http.Error(w, "cannot hold the connection for the window: "+err.Error(), http.StatusInternalServerError)
			return
		}
		p, err = a.allocProfile(r.Context(), conts, window)
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
	_, _ = w.Write(buf.Bytes()) // a client that went away: nothing to do
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
	a.freshFigures()
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
		for _, p := range []string{e.Profile, e.RSSProfile, e.Report, e.Text} {
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
	_ = enc.Encode(v) // the values are ours and encodable; a write error is a client gone
}
