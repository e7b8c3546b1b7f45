package agent

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/report"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// MaxGrowthWindow caps ?window= of /profiles/growth.
const MaxGrowthWindow = 7 * 24 * time.Hour

// ContainerGrowth is one container's entry of GET /profiles/growth.
type ContainerGrowth struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Container string `json:"container"`
	Profiles  int    `json:"profiles"` // stored profiles in the window (at most series.MaxPoints, evenly spaced)
	Skipped   int    `json:"skipped"`  // stored profiles that could not be read
	// Report is the growth analysis of the stored profiles: live bytes per
	// stack at each profile's time, classified; alloc bytes are those of
	// the newest profile (allocated since the container was first
	// profiled). Nil with fewer than two profiles.
	Report *report.Report `json:"report,omitempty"`
	Note   string         `json:"note,omitempty"`
}

// serveGrowth answers /profiles/growth?namespace=&pod=&container=&window=1h:
// what grew in each selected container over the window, from the profiles
// the agent stored every --profile-interval.
func (a *Agent) serveGrowth(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, pod, name := q.Get("namespace"), q.Get("pod"), q.Get("container")
	if pod == "" {
		http.Error(w, "give ?pod=NAME (and namespace=, container=, window=1h); GET /profiles lists the profiled containers", http.StatusBadRequest)
		return
	}
	window := time.Hour
	if s := q.Get("window"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 || d > MaxGrowthWindow {
			http.Error(w, fmt.Sprintf("window must be a duration such as 30m or 6h, at most %s", MaxGrowthWindow), http.StatusBadRequest)
			return
		}
		window = d
	}
	var sel []labelSet
	for _, c := range a.find(ns, pod, name) {
		sel = append(sel, c.labels)
	}
	if len(sel) == 0 && ns != "" && name != "" {
		// A container no longer profiled (gone, OOM-killed) whose
		// profiles are still kept.
		sel = append(sel, labelSet{Namespace: ns, Pod: pod, Container: name})
	}
	out := []ContainerGrowth{}
	for _, l := range sel {
		g := a.growthOf(l, time.Now().Add(-window))
		if g.Profiles == 0 && len(a.find(l.Namespace, l.Pod, l.Container)) == 0 {
			continue
		}
		out = append(out, g)
	}
	if len(out) == 0 {
		http.Error(w, fmt.Sprintf("no profiled container or stored profiles for namespace=%q pod=%q container=%q on node %s (GET /profiles lists them)", ns, pod, name, a.cfg.NodeName), http.StatusNotFound)
		return
	}
	writeJSON(w, out)
}

// growthOf reads the container's stored profiles newer than since and
// analyzes them as one series.
func (a *Agent) growthOf(l labelSet, since time.Time) ContainerGrowth {
	g := ContainerGrowth{Namespace: l.Namespace, Pod: l.Pod, Container: l.Container}
	dir := a.containerDir(&container{labels: l})
	ents, _ := os.ReadDir(dir)
	type stored struct {
		path string
		at   time.Time
	}
	var files []stored
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || !strings.HasSuffix(n, ".pb.gz") || strings.HasPrefix(n, ".") {
			continue
		}
		at, err := time.Parse("20060102T150405Z", strings.TrimSuffix(n, ".pb.gz"))
		if err != nil {
			continue
		}
		if !at.Before(since) {
			files = append(files, stored{filepath.Join(dir, n), at})
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].at.Before(files[j].at) })
	if n := len(files); n > series.MaxPoints {
		picked := make([]stored, 0, series.MaxPoints)
		for i := 0; i < series.MaxPoints; i++ {
			picked = append(picked, files[i*(n-1)/(series.MaxPoints-1)])
		}
		files = picked
	}
	var profiles []*profile.Profile
	var times []time.Time
	for _, f := range files {
		p, err := pprofout.ReadFile(f.path)
		if err != nil {
			g.Skipped++
			continue
		}
		profiles = append(profiles, p)
		times = append(times, f.at)
	}
	g.Profiles = len(profiles)
	if len(profiles) < 2 {
		g.Note = fmt.Sprintf("%d stored profiles in the window: need two or more (profiles are stored every --profile-interval)", len(profiles))
		return g
	}
	s := SeriesOfProfiles(profiles, times)
	g.Report = report.Analyze(profiles[len(profiles)-1], s)
	return g
}

// SeriesOfProfiles turns heap profiles taken at times (oldest first) into a
// series: the inuse_space of each stack (frames as pprofout.StackFrames
// renders them) at each time, 0 where a profile lacks the stack.
func SeriesOfProfiles(profiles []*profile.Profile, times []time.Time) *series.Series {
	s := &series.Series{Version: series.Version, Start: times[0]}
	if len(profiles) > 0 && profiles[0].Period > 0 {
		s.SampleRate = uint64(profiles[0].Period)
	}
	byKey := map[string]int{}
	for i, p := range profiles {
		s.TimesMS = append(s.TimesMS, times[i].Sub(times[0]).Milliseconds())
		vi := -1
		for j, st := range p.SampleType {
			if st.Type == "inuse_space" {
				vi = j
			}
		}
		for _, smp := range p.Sample {
			if vi < 0 || vi >= len(smp.Value) || smp.Value[vi] == 0 {
				continue
			}
			f := pprofout.StackFrames(smp.Location)
			k := strings.Join(f, "\x00")
			idx, ok := byKey[k]
			if !ok {
				idx = len(s.Stacks)
				byKey[k] = idx
				s.Stacks = append(s.Stacks, series.Stack{Frames: f, Inuse: make([]int64, len(profiles))})
			}
			s.Stacks[idx].Inuse[i] += smp.Value[vi]
		}
	}
	if n := len(s.TimesMS); n > 1 {
		s.IntervalMS = (s.TimesMS[n-1] - s.TimesMS[0]) / int64(n-1)
	}
	return s
}
