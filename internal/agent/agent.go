// Package agent is `memprof agent`: the node agent of a Kubernetes
// DaemonSet. It discovers the pods of its node without the API server
// (internal/podfind), profiles the containers selected by annotation or
// namespace with one recording session (internal/recorder), watches every
// container for OOM kills, and serves Prometheus metrics, heap profiles and
// OOM post-mortems on one port. Profiles are kept on disk with a retention
// and optionally pushed to Pyroscope.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/recorder"
	"github.com/prometheus/client_golang/prometheus"
)

// AnnotationProfile is the pod annotation that selects a pod ("true").
const AnnotationProfile = "memprof.io/profile"

// Config configures an agent. Zero durations take the defaults below.
type Config struct {
	Listen    string // address to bind, e.g. "10.0.0.5:9464" or "127.0.0.1:0"
	TokenFile string // bearer token for everything but /healthz and /metrics
	NodeName  string // value of the node label
	Paths     podfind.Paths

	// Namespaces selects every container of these namespaces ("*": all).
	// Pods annotated memprof.io/profile: "true" are selected too (when a
	// CRI socket answers: annotations come only from CRI). ExcludeNamespaces
	// are never profiled. With only ExcludeNamespaces set, every other
	// namespace is selected.
	Namespaces, ExcludeNamespaces []string

	DataDir         string        // profiles/ and oom/ go here
	ProfileInterval time.Duration // periodic profiles (default 1m)
	Retention       time.Duration // age after which periodic profiles are deleted (default 24h)
	PyroscopeURL    string        // push periodic profiles there when set

	// MaxCallsPerSecond is the overhead budget: a target process making more
	// allocator calls per second is detached (0: no budget).
	MaxCallsPerSecond float64
	SampleRate        uint64 // mean bytes between samples (default recorder.DefaultSampleRate)

	// DiscoverInterval: pod rediscovery (default: 30 s where the kernel's
	// cgroup events wake discovery at once, a safety net; 5 s where they
	// are not available, the process connector fallback).
	DiscoverInterval time.Duration
	CollectInterval  time.Duration // metrics and budget (default 2s)
	MaxOOMEntries    int           // OOM post-mortems listed in /oom and kept on disk (default 200)

	HTTP ServerLimits // timeouts and connection cap of the port (defaults: DefaultServerLimits)

	// Log receives the agent's structured records (default: slog's text
	// handler on stderr; see log.go for the attributes and the escaping of
	// what targets control). Without Log, a Logf given receives each
	// record as one line of text (key=value, no time), as tests want.
	Log  *slog.Logger
	Logf func(format string, args ...any)

	// NoRSS turns off the RSS profiles every container gets by default
	// (rss.go).
	NoRSS bool
}

func (c *Config) defaults() {
	if c.ProfileInterval <= 0 {
		c.ProfileInterval = time.Minute
	}
	if c.Retention <= 0 {
		c.Retention = 24 * time.Hour
	}
	if c.SampleRate == 0 {
		c.SampleRate = recorder.DefaultSampleRate
	}
	if c.CollectInterval <= 0 {
		c.CollectInterval = 2 * time.Second
	}
	if c.MaxOOMEntries <= 0 {
		c.MaxOOMEntries = 200
	}
	if c.Log == nil {
		if c.Logf != nil {
			c.Log = logfLogger(c.Logf)
		} else {
			c.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
		}
	}
	// Logf, still there for callers of the printf style, logs to Log too
	// (the line as the record's message, quoted by the handler).
	lg := c.Log
	c.Logf = func(format string, args ...any) {
		lg.Info(strings.TrimPrefix(fmt.Sprintf(format, args...), "memprof agent: "))
	}
	if c.NodeName == "" {
		c.NodeName, _ = os.Hostname()
	}
	if c.Paths.ProcRoot == "" && c.Paths.CgroupRoot == "" && c.Paths.PodLogs == "" {
		c.Paths = podfind.DefaultPaths()
	}
}

// agentRescan is how often the recorder re-lists every followed cgroup
// regardless of events (recorder.Options.Rescan).
const agentRescan = 30 * time.Second

// Agent is a running agent.
type Agent struct {
	cfg   Config
	s     heapSession // nil until Run has loaded the programs
	token *tokenFile
	ln    net.Listener
	srv   *http.Server
	reg   *prometheus.Registry // what /metrics serves

	mu         sync.Mutex
	known      map[string]*container // every container discovered, by container id
	profiled   map[string]*container // the selected ones being profiled
	gone       map[labelSet]time.Time
	oomKills   map[labelSet]uint64 // per container (kept for an hour after it goes)
	ooms       []OOMEntry          // newest last, at most MaxOOMEntries
	oomTotal   map[bool]uint64     // by "victim was profiled"
	budgetHits map[labelSet]uint64 // processes detached by the budget, per container
	budgetAll  uint64
	lastCalls  map[uint32]uint64
	// the targets when the containers' process lists were last read
	lastTargets map[int]bool
	lastPidList time.Time
	lastTotal   uint64
	lastTick    time.Time // last per-container figures (allocation rates)
	lastBudget  time.Time // last budget check (call rates)
	// figMu serializes collections (periodic, and a scrape's freshFigures);
	// lastFigures is the last computation of the figures
	figMu       sync.Mutex
	lastFigures time.Time
	probeRate   float64
	probeTotal  uint64
	discErrs    uint64
	lastDisc    error
	pushErrs    uint64
	pushes      uint64
	saved       uint64
	rss         *rssTier // nil: RSS profiles off

	// wake: a cgroup event asks discovery to run now (discover.go's
	// onCgroupEvent); unnamed: the cgroup ids of containers found without
	// names yet, whose execs wake it too.
	wake    chan struct{}
	unnamed atomic.Pointer[map[uint64]bool]
	// v1Wait: containers found with a v2 directory but not yet their v1
	// memory one, by id, with when first found (a.mu held; v1Grace).
	v1Wait map[string]time.Time
}

// labelSet identifies a container in metrics.
type labelSet struct{ Namespace, Pod, Container string }

type container struct {
	c      podfind.Container
	dir    string // memory cgroup directory followed
	memcg  uint64 // its v1 memory cgroup id (inode), 0 if none
	cgv2   uint64 // its v2 cgroup id
	labels labelSet
	since  time.Time

	// excluded: processes detached by the overhead budget (reported).
	excluded map[int]bool

	// collected figures
	pids      []int // processes of the cgroup (and below) when last read
	pidsRead  bool
	live      float64
	allocCum  map[uint32]float64 // per process, unsampled alloc bytes so far
	retired   float64            // alloc bytes of processes gone
	allocTot  float64
	allocRate float64
	procs     int
}

// New checks the configuration, reads the token and binds the port; Run
// starts the work. Nothing is loaded into the kernel until Run.
func New(cfg Config) (*Agent, error) {
	cfg.defaults()
	if cfg.DataDir == "" {
		return nil, errors.New("no --data-dir: the agent keeps profiles and OOM post-mortems there")
	}
	tf, err := openToken(cfg.TokenFile)
	if err != nil {
		return nil, err
	}
	for _, d := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "profiles"), filepath.Join(cfg.DataDir, "oom")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create data directory %s: %w", d, err)
		}
	}
	if cfg.Listen == "" {
		return nil, errors.New("no --listen address (the manifest binds the pod IP: --listen=$(POD_IP):9464)")
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	a := &Agent{
		cfg:        cfg,
		token:      tf,
		ln:         ln,
		known:      map[string]*container{},
		profiled:   map[string]*container{},
		gone:       map[labelSet]time.Time{},
		oomKills:   map[labelSet]uint64{},
		oomTotal:   map[bool]uint64{},
		budgetHits: map[labelSet]uint64{},
		lastCalls:  map[uint32]uint64{},
		wake:       make(chan struct{}, 1),
		v1Wait:     map[string]time.Time{},
	}
	a.reg = newRegistry(a)
	a.loadOOMs()
	a.srv, a.ln = a.newServer(ln)
	return a, nil
}

// Addr is the address the agent listens on.
func (a *Agent) Addr() string { return a.ln.Addr().String() }

// Run loads the BPF programs, serves HTTP and works until ctx is cancelled
// (SIGTERM); then it detaches everything and returns.
func (a *Agent) Run(ctx context.Context) error {
	s, err := recorder.Start(ctx, recorder.Options{
		SampleRate: a.cfg.SampleRate,
		// 4 MiB of stack copies in flight (~500 at 8 KiB) rather than 16:
		// the ring is mapped twice, 32 MiB of the agent's RSS otherwise;
		// copies a full ring drops are counted (lost events).
		EventsBytes: 4 << 20,
		AllowEmpty:  true,
		DropExited:  true,
		AllOOMs:     true,
		// New processes come from process events (forks in a followed
		// cgroup) and from discovery (discover tells which cgroups have
		// new ones); the full re-listing of every followed cgroup is a
		// safety net, not a poll.
		Rescan: agentRescan,
		// The RSS tier reclaims exited processes and re-reads the
		// mappings of exec'd ones from the same events.
		ProcessExited: func(pid int) {
			if t := a.rssTier(); t != nil {
				t.s.ProcessExited(pid)
			}
		},
		ProcessExeced: func(pid int) {
			if t := a.rssTier(); t != nil {
				t.s.ProcessExeced(pid)
			}
		},
		Notify: func(msg string) { a.cfg.Log.Info(msg) },
		OOM:    a.onOOM,

		// Cgroup events wake discovery (discover.go).
		CgroupEvents: a.onCgroupEvent,
	})
	if err != nil {
		a.ln.Close()
		return err
	}
	a.mu.Lock()
	a.s = s
	a.lastTick = time.Now()
	a.lastBudget = a.lastTick
	a.mu.Unlock()
	a.cfg.Log.Info("agent started", "listen", a.Addr(), "node", a.cfg.NodeName, "sample_rate", a.cfg.SampleRate, "features", s.Features().String())
	a.startRSS(ctx)

	srvErr := make(chan error, 1)
	go func() { srvErr <- a.srv.Serve(a.ln) }()

	var wg sync.WaitGroup
	loop := func(every time.Duration, f func(context.Context)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				f(ctx)
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	wg.Add(1)
	go func() { defer wg.Done(); a.discoverLoop(ctx, s.ProcEvents()) }()
	loop(a.cfg.CollectInterval, a.collect)
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(a.cfg.ProfileInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				a.saveProfiles(ctx)
				a.saveRSSProfiles(ctx)
			}
		}
	}()

	var runErr error
	select {
	case <-ctx.Done():
	case err := <-srvErr:
		if !errors.Is(err, http.ErrServerClosed) {
			runErr = fmt.Errorf("serve HTTP: %w", err)
		}
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := a.srv.Shutdown(shutCtx); err != nil {
		a.cfg.Log.Warn("http shutdown: connections closed", "err", err)
	}
	cancel()
	wg.Wait()
	a.mu.Lock()
	n := len(a.profiled)
	for id, c := range a.profiled {
		a.s.RemoveCgroup(c.dir, c.targetPids(a.s))
		delete(a.profiled, id)
	}
	a.mu.Unlock()
	a.stopRSS()
	s.Close()
	a.cfg.Log.Info("agent stopped", "detached_containers", n)
	return runErr
}

// selected tells whether a container is to be profiled.
func (a *Agent) selected(c *podfind.Container) bool {
	if c.Namespace == "" {
		return false
	}
	for _, ns := range a.cfg.ExcludeNamespaces {
		if ns == c.Namespace {
			return false
		}
	}
	switch strings.ToLower(c.Annotations[AnnotationProfile]) {
	case "true":
		return true
	case "false":
		return false
	}
	if len(a.cfg.Namespaces) == 0 {
		return len(a.cfg.ExcludeNamespaces) > 0
	}
	for _, ns := range a.cfg.Namespaces {
		if ns == "*" || ns == c.Namespace {
			return true
		}
	}
	return false
}

// v1Grace is how long a container found without its v1 memory cgroup
// directory (on a host that has that hierarchy) waits for it before it is
// followed in its v2 directory alone.
const v1Grace = 2 * time.Second

// discover lists the node's containers, attaches to the selected ones that
// appeared and detaches from the ones that went.
func (a *Agent) discover(ctx context.Context) {
	all, err := podfind.Discover(ctx, a.cfg.Paths)
	if err != nil && !errors.Is(err, podfind.ErrPartial) {
		a.mu.Lock()
		a.discErrs++
		first := a.lastDisc == nil || a.lastDisc.Error() != err.Error()
		a.lastDisc = err
		a.mu.Unlock()
		if first {
			a.cfg.Log.Error("pod discovery failed", "err", err)
		}
		return
	}
	if err != nil {
		a.mu.Lock()
		first := a.lastDisc == nil || a.lastDisc.Error() != err.Error()
		a.lastDisc = err
		a.mu.Unlock()
		if first {
			a.cfg.Log.Warn("pod discovery incomplete", "err", err)
		}
	}
	now := time.Now()
	seen := map[string]bool{}
	var toAdd []*container
	var changed []string // cgroups of known containers with new processes
	a.mu.Lock()
	for i := range all {
		pc := all[i]
		seen[pc.ID] = true
		c := a.known[pc.ID]
		if c == nil && pc.NoV1Memory && pc.CgroupV2 != "" {
			// Found between the runtime's v2 and v1 mkdirs: wait (the v1
			// mkdir's event, or the wake below, runs discovery again) so
			// the container is followed in its memory cgroup, whose
			// statistics and OOM kills are the ones that matter.
			first, ok := a.v1Wait[pc.ID]
			if !ok {
				first = now
				a.v1Wait[pc.ID] = now
				time.AfterFunc(v1Grace, func() {
					select {
					case a.wake <- struct{}{}:
					default:
					}
				})
			}
			if now.Sub(first) < v1Grace {
				continue
			}
		}
		delete(a.v1Wait, pc.ID)
		if c == nil {
			c = &container{c: pc, labels: labelSet{pc.Namespace, pc.Pod, pc.Name}, since: now,
				excluded: map[int]bool{}, allocCum: map[uint32]float64{}}
			c.dir = pc.CgroupV1Memory
			if c.dir == "" {
				c.dir = pc.CgroupV2
			}
			if pc.CgroupV1Memory != "" {
				c.memcg, _ = cgroups.ID(pc.CgroupV1Memory)
			}
			if pc.CgroupV2 != "" {
				c.cgv2, _ = cgroups.ID(pc.CgroupV2)
			}
			a.known[pc.ID] = c
		}
		if newPids(c.c.Pids, pc.Pids) && c.dir != "" {
			changed = append(changed, c.dir)
		}
		c.c.Pids = pc.Pids
		if l := (labelSet{pc.Namespace, pc.Pod, pc.Name}); l != c.labels {
			// Names got better (CRI answered): labels are read without
			// the lock, so replace the container rather than change it.
			nc := *c
			nc.c, nc.labels = pc, l
			c = &nc
			a.known[pc.ID] = c
			if _, on := a.profiled[pc.ID]; on {
				a.profiled[pc.ID] = c
			}
		}
		delete(a.gone, c.labels)
		_, on := a.profiled[pc.ID]
		want := a.selected(&pc) && c.dir != ""
		switch {
		case want && !on:
			toAdd = append(toAdd, c)
		case !want && on:
			a.detachLocked(c, "no longer selected")
		}
	}
	for id, c := range a.known {
		if seen[id] {
			continue
		}
		if _, on := a.profiled[id]; on {
			a.detachLocked(c, "container gone")
		}
		delete(a.known, id)
		a.gone[c.labels] = now
	}
	for id := range a.v1Wait {
		if !seen[id] {
			delete(a.v1Wait, id)
		}
	}
	a.noteUnnamedLocked()
	// Forget per-container counters an hour after the container went, so
	// churn cannot grow them without bound.
	for l, t := range a.gone {
		if now.Sub(t) > time.Hour {
			delete(a.gone, l)
			delete(a.oomKills, l)
			delete(a.budgetHits, l)
		}
	}
	a.mu.Unlock()

	for _, c := range toAdd {
		if err := a.s.AddCgroup(c.dir); err != nil {
			a.cfg.Log.Warn("attach to container", c.labels.logAttrs("cgroup", c.dir, "err", err)...)
			// still followed: the recorder retries new processes each poll
		}
		a.mu.Lock()
		a.profiled[c.c.ID] = c
		a.mu.Unlock()
		a.cfg.Log.Info("profiling container", c.labels.logAttrs("cgroup", c.dir)...)
	}
	a.rssSync()
	// Discovery read every container's processes: the sessions rescan
	// only the cgroups where new ones appeared (their own full rescans
	// are a slow safety net, agentRescan).
	t := a.rssTier()
	for _, dir := range changed {
		a.s.CgroupChanged(dir)
		if t != nil {
			t.s.CgroupChanged(dir)
		}
	}
}

// newPids reports whether now lists a process that was not in before
// (both sorted, as podfind returns them).
func newPids(before, now []int) bool {
	i := 0
	for _, p := range now {
		for i < len(before) && before[i] < p {
			i++
		}
		if i == len(before) || before[i] != p {
			return true
		}
	}
	return false
}

func (c *container) name() string {
	return fmt.Sprintf("%s/%s/%s", c.labels.Namespace, c.labels.Pod, c.labels.Container)
}

// targetPids are the session's targets in the container's cgroup now.
func (c *container) targetPids(s heapSession) []int {
	pids, _ := cgroups.Procs(c.dir, true)
	return append(pids, c.c.Pids...)
}

func (a *Agent) detachLocked(c *container, why string) {
	a.s.RemoveCgroup(c.dir, c.targetPids(a.s))
	delete(a.profiled, c.c.ID)
	a.cfg.Log.Info("stopped profiling container", c.labels.logAttrs("cgroup", c.dir, "why", why)...)
}

// profiledSnapshot copies the profiled containers.
func (a *Agent) profiledList() []*container {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*container, 0, len(a.profiled))
	for _, c := range a.profiled {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name() < out[j].name() })
	return out
}

// find returns the profiled containers matching a query (container "" = all
// containers of the pod).
func (a *Agent) find(namespace, pod, name string) []*container {
	var out []*container
	for _, c := range a.profiledList() {
		if c.labels.Pod == pod && (namespace == "" || c.labels.Namespace == namespace) && (name == "" || c.labels.Container == name) {
			out = append(out, c)
		}
	}
	return out
}

// TargetCount is the number of processes the session has probes on.
func (a *Agent) TargetCount() int {
	a.mu.Lock()
	s := a.s
	a.mu.Unlock()
	if s == nil {
		return 0
	}
	return len(s.Targets())
}

// Ready reports whether Run has loaded the programs.
func (a *Agent) Ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.s != nil
}
