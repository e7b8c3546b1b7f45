// Package report turns a memprof profile and its series (package series)
// into what a person reads: the top stacks, fragmentation and losses, and
// "what grew" — each stack's live bytes over the recording, classified by
// package growth — as text, JSON or one self-contained HTML file.
package report

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/growth"
	"github.com/memprof/memprof/internal/oom"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// Stack is one stack of the report: its totals in the profile, its live
// bytes over time and its classification.
type Stack struct {
	Frames       []string       `json:"frames"` // leaf first, as pprofout.Top renders them
	InuseBytes   int64          `json:"inuse_bytes"`
	InuseObjects int64          `json:"inuse_objects"`
	AllocBytes   int64          `json:"alloc_bytes"`
	AllocObjects int64          `json:"alloc_objects"`
	Growth       growth.Verdict `json:"growth"`
	// Series is the stack's live bytes at Report.TimesS (series.Absent
	// where its processes were not running); nil without a series.
	Series []int64 `json:"series_inuse_bytes,omitempty"`
}

// Report is everything the report shows.
type Report struct {
	Profile       string           `json:"profile"`
	Samples       int              `json:"samples"`
	SampleRate    int64            `json:"sample_rate"`
	DurationS     float64          `json:"duration_s"`
	Fragmentation []string         `json:"fragmentation,omitempty"`
	Lost          []string         `json:"lost,omitempty"`
	Notes         []string         `json:"notes,omitempty"`
	SeriesFile    string           `json:"series_file,omitempty"`
	SeriesMissing string           `json:"series_missing,omitempty"` // why there is no series
	IntervalMS    int64            `json:"interval_ms,omitempty"`
	TimesS        []float64        `json:"times_s,omitempty"`
	TotalInuse    []int64          `json:"total_inuse_bytes,omitempty"`
	Processes     []series.Process `json:"processes,omitempty"`
	Cgroups       []series.Cgroup  `json:"cgroups,omitempty"`
	Untracked     int              `json:"untracked_stacks,omitempty"`
	// Counts of stacks per trend.
	Trends map[growth.Trend]int `json:"trends"`
	// Stacks, growing first (fastest first), then by live bytes, then
	// temporary by bytes allocated.
	Stacks []Stack `json:"stacks"`
	// OOM is the post-mortem of an OOM kill when the profile is one
	// (oom-*.pb.gz with its oom-*.json next to it).
	OOM *oom.Report `json:"oom,omitempty"`

	profile *profile.Profile
}

// Load reads a profile, its series sidecar (series.SidecarPath) and, for an
// OOM post-mortem, its report, and analyzes them. A missing or unreadable
// series is no error: the report says why it has no time axis.
func Load(path string) (*Report, error) {
	p, err := pprofout.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s *series.Series
	sp := series.SidecarPath(path)
	why := ""
	if s, err = series.ReadFile(sp); err != nil {
		s = nil
		switch {
		case errors.Is(err, series.ErrNoSeries) && isRSSProfile(p):
			why = "an RSS profile has no series (memory resident at the end of the window, by the stack that faulted it in): no time axis, trends unknown"
		case errors.Is(err, series.ErrNoSeries):
			why = "no series file " + sp + " (recorded by an older memprof, an OOM post-mortem, or the file was not copied with the profile): no time axis, trends unknown"
		default:
			why = err.Error()
		}
	} else if p.TimeNanos != 0 && s.Start.UnixNano() != p.TimeNanos {
		// Both carry the session's start: a mismatch is a series left by
		// another recording under the same name.
		why = fmt.Sprintf("%s belongs to another recording (started %s, the profile %s): ignored", sp,
			s.Start.UTC().Format(time.RFC3339), time.Unix(0, p.TimeNanos).UTC().Format(time.RFC3339))
		s = nil
	}
	r := Analyze(p, s)
	r.Profile = path
	if s != nil {
		r.SeriesFile = sp
	} else {
		r.SeriesMissing = why
	}
	if base := filepath.Base(path); strings.HasPrefix(base, "oom-") && strings.HasSuffix(base, ".pb.gz") {
		if data, err := readBounded(strings.TrimSuffix(path, ".pb.gz")+".json", 16<<20); err == nil {
			var o oom.Report
			if json.Unmarshal(data, &o) == nil {
				r.OOM = &o
			}
		}
	}
	return r, nil
}

// isRSSProfile reports whether p is an RSS-tier profile (its sample types
// include rss_space): record --rss writes no series sidecar.
func isRSSProfile(p *profile.Profile) bool {
	for _, st := range p.SampleType {
		if st.Type == pprofout.RSSSpace {
			return true
		}
	}
	return false
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(data)) > limit {
		err = fmt.Errorf("%s: larger than %d bytes", path, limit)
	}
	return data, err
}

type totals struct {
	inuse, inuseObj, alloc, allocObj int64
	frames                           []string
}

// Analyze joins the profile's stacks (summed over labels and block sizes,
// as pprofout.Top does) with the series' stacks by their frames and
// classifies each with growth.Classify (quantum: the profile's sample
// rate). s may be nil: trends are then unknown.
func Analyze(p *profile.Profile, s *series.Series) *Report {
	r := &Report{Samples: len(p.Sample), SampleRate: p.Period, DurationS: float64(p.DurationNanos) / 1e9,
		Trends: map[growth.Trend]int{}, profile: p}
	for _, cm := range p.Comments {
		kv, ok := strings.CutPrefix(cm, "memprof: ")
		switch {
		case !ok:
			r.Notes = append(r.Notes, cm)
		case strings.HasPrefix(kv, "frag"):
			r.Fragmentation = append(r.Fragmentation, kv)
		case strings.HasPrefix(kv, "lost_"):
			r.Lost = append(r.Lost, kv)
		default:
			r.Notes = append(r.Notes, kv)
		}
	}
	idx := map[string]int{}
	for i, st := range p.SampleType {
		idx[st.Type] = i
	}
	val := func(s *profile.Sample, name string) int64 {
		if i, ok := idx[name]; ok && i < len(s.Value) {
			return s.Value[i]
		}
		return 0
	}
	byKey := map[string]*totals{}
	var order []string
	get := func(frames []string) *totals {
		k := strings.Join(frames, "\x00")
		t := byKey[k]
		if t == nil {
			t = &totals{frames: frames}
			byKey[k] = t
			order = append(order, k)
		}
		return t
	}
	for _, smp := range p.Sample {
		t := get(pprofout.StackFrames(smp.Location))
		t.inuse += val(smp, "inuse_space")
		t.inuseObj += val(smp, "inuse_objects")
		t.alloc += val(smp, "alloc_space")
		t.allocObj += val(smp, "alloc_objects")
	}
	seriesOf := map[string][]int64{}
	var times []float64
	if s != nil {
		times = s.Seconds()
		r.IntervalMS = s.IntervalMS
		r.TimesS = times
		r.TotalInuse = s.TotalInuse()
		r.Processes = s.Processes
		r.Cgroups = s.Cgroups
		r.Untracked = s.Untracked
		for _, st := range s.Stacks {
			k := strings.Join(st.Frames, "\x00")
			seriesOf[k] = st.Inuse
			get(st.Frames)
		}
	}
	// Only the MaxClassified largest stacks (by peak live or allocated
	// bytes) are classified: a few milliseconds each.
	size := func(k string) int64 {
		v := max(byKey[k].inuse, byKey[k].alloc)
		for _, x := range seriesOf[k] {
			v = max(v, x)
		}
		return v
	}
	bySize := append([]string(nil), order...)
	sort.SliceStable(bySize, func(i, j int) bool { return size(bySize[i]) > size(bySize[j]) })
	classify := map[string]bool{}
	for i, k := range bySize {
		classify[k] = i < MaxClassified
	}
	for _, k := range order {
		t := byKey[k]
		st := Stack{Frames: t.frames, InuseBytes: t.inuse, InuseObjects: t.inuseObj, AllocBytes: t.alloc, AllocObjects: t.allocObj}
		if t.inuse == 0 && t.alloc == 0 && seriesOf[k] == nil {
			continue
		}
		if s != nil && !classify[k] {
			st.Series = seriesOf[k]
			st.Growth = growth.Verdict{Trend: growth.Unknown, Confidence: growth.None, P: 1,
				Reasons: []string{fmt.Sprintf("not classified: only the %d largest stacks are", MaxClassified)}}
		} else if s != nil {
			st.Series = seriesOf[k]
			if st.Series == nil {
				st.Series = make([]int64, len(times))
			}
			var ts, xs []float64
			for i, v := range st.Series {
				if v != series.Absent {
					ts = append(ts, times[i])
					xs = append(xs, float64(v))
				}
			}
			st.Growth = growth.Classify(growth.Input{Times: ts, Live: xs, AllocBytes: float64(t.alloc), Quantum: float64(p.Period)})
		} else {
			st.Growth = growth.Verdict{Trend: growth.Unknown, Confidence: growth.None, P: 1, Reasons: []string{"no series recorded"}}
		}
		r.Trends[st.Growth.Trend]++
		r.Stacks = append(r.Stacks, st)
	}
	rank := func(st *Stack) int {
		switch st.Growth.Trend {
		case growth.Growing:
			return 0
		case growth.Temporary:
			return 2
		}
		return 1
	}
	sort.SliceStable(r.Stacks, func(i, j int) bool {
		a, b := &r.Stacks[i], &r.Stacks[j]
		if ra, rb := rank(a), rank(b); ra != rb {
			return ra < rb
		}
		switch rank(a) {
		case 0:
			return a.Growth.RatePerMin > b.Growth.RatePerMin
		case 2:
			return a.AllocBytes > b.AllocBytes
		}
		if a.InuseBytes != b.InuseBytes {
			return a.InuseBytes > b.InuseBytes
		}
		return strings.Join(a.Frames, "\x00") < strings.Join(b.Frames, "\x00")
	})
	return r
}

// MaxClassified is the number of stacks Analyze classifies, largest first.
const MaxClassified = 1000

// Leaks returns the stacks classified growing, with at least medium
// confidence, whose growth rate exceeds limit bytes per minute: what the
// CI leak gate fails on.
func (r *Report) Leaks(limitPerMin float64) []Stack {
	var out []Stack
	for _, st := range r.Stacks {
		if st.Growth.Trend == growth.Growing && st.Growth.Confidence != growth.Low && st.Growth.Confidence != growth.None &&
			st.Growth.RatePerMin > limitPerMin {
			out = append(out, st)
		}
	}
	return out
}

// WriteJSON writes the report as indented JSON.
func WriteJSON(w io.Writer, r *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// sparkline renders v (series.Absent as a blank) in at most width cells
// of ▁▂▃▄▅▆▇█ scaled from 0 to the maximum; each cell shows the largest
// value of the points it covers.
func sparkline(v []int64, width int) string {
	if len(v) == 0 || width <= 0 {
		return ""
	}
	cells := min(width, len(v))
	vals := make([]int64, cells)
	var top int64
	for c := 0; c < cells; c++ {
		vals[c] = series.Absent
		for i := c * len(v) / cells; i < (c+1)*len(v)/cells; i++ {
			vals[c] = max(vals[c], v[i])
		}
		top = max(top, vals[c])
	}
	bars := []rune("▁▂▃▄▅▆▇█")
	var sb strings.Builder
	for _, x := range vals {
		switch {
		case x == series.Absent:
			sb.WriteRune(' ')
		case top <= 0:
			sb.WriteRune(bars[0])
		default:
			sb.WriteRune(bars[int(math.Round(float64(x)/float64(top)*float64(len(bars)-1)))])
		}
	}
	return sb.String()
}

func rate(perMin float64) string {
	s := pprofout.HumanBytes(int64(math.Round(perMin))) + "/min"
	if perMin > 0 {
		s = "+" + s
	}
	return s
}

// WriteGrowth writes the "what grew" section: the top stacks with their
// trend, confidence, growth rate, live and allocated bytes, a sparkline of
// their live bytes and up to frames frames each.
func WriteGrowth(w io.Writer, r *Report, top, frames int) error {
	var sb strings.Builder
	sb.WriteString("\nwhat grew")
	if r.SeriesMissing != "" {
		fmt.Fprintf(&sb, ": %s\n", r.SeriesMissing)
		_, err := io.WriteString(w, sb.String())
		return err
	}
	n := len(r.TimesS)
	span := 0.0
	if n > 1 {
		span = r.TimesS[n-1] - r.TimesS[0]
	}
	fmt.Fprintf(&sb, " (%d points over %.1f s, every %s at the end):\n", n, span, fmtMS(r.IntervalMS))
	if n > 0 {
		fmt.Fprintf(&sb, "  total live %s -> %s  %s\n", pprofout.HumanBytes(first(r.TotalInuse)), pprofout.HumanBytes(last(r.TotalInuse)), sparkline(r.TotalInuse, 24))
		for _, p := range r.Processes {
			fmt.Fprintf(&sb, "  RSS pid %d (%s) %s -> %s, RssAnon %s -> %s  %s\n", p.Pid, p.Comm, pprofout.HumanBytes(first(p.RSS)), pprofout.HumanBytes(last(p.RSS)),
				pprofout.HumanBytes(first(p.RssAnon)), pprofout.HumanBytes(last(p.RssAnon)), sparkline(p.RSS, 24))
		}
		for _, c := range r.Cgroups {
			fmt.Fprintf(&sb, "  cgroup %s usage %s -> %s  %s\n", c.Path, pprofout.HumanBytes(first(c.Usage)), pprofout.HumanBytes(last(c.Usage)), sparkline(c.Usage, 24))
		}
	}
	var parts []string
	for _, t := range []growth.Trend{growth.Growing, growth.Steady, growth.Temporary, growth.Shrinking, growth.Unknown} {
		if c := r.Trends[t]; c > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", c, t))
		}
	}
	fmt.Fprintf(&sb, "  stacks: %s\n", strings.Join(parts, ", "))
	if r.Untracked > 0 {
		fmt.Fprintf(&sb, "  %d stacks beyond the series' limit were summed, not tracked one by one\n", r.Untracked)
	}
	fmt.Fprintf(&sb, "%4s  %-9s  %-6s  %14s  %10s  %10s  %-24s\n", "rank", "trend", "conf", "growth", "live", "allocated", "live over time")
	for i, st := range r.Stacks {
		if top > 0 && i >= top {
			break
		}
		fmt.Fprintf(&sb, "%4d  %-9s  %-6s  %14s  %10s  %10s  %-24s\n", i+1, st.Growth.Trend, st.Growth.Confidence, rate(st.Growth.RatePerMin),
			pprofout.HumanBytes(st.InuseBytes), pprofout.HumanBytes(st.AllocBytes), sparkline(st.Series, 24))
		fs := st.Frames
		if frames > 0 && len(fs) > frames {
			fs = fs[:frames]
		}
		for _, f := range fs {
			fmt.Fprintf(&sb, "        %s\n", f)
		}
		if more := len(st.Frames) - len(fs); more > 0 {
			fmt.Fprintf(&sb, "        ... %d more\n", more)
		}
		for _, why := range st.Growth.Reasons {
			fmt.Fprintf(&sb, "      - %s\n", why)
		}
	}
	_, err := io.WriteString(w, sb.String())
	return err
}

func fmtMS(ms int64) string {
	if ms%1000 == 0 {
		return fmt.Sprintf("%ds", ms/1000)
	}
	return fmt.Sprintf("%dms", ms)
}

// first and last return the first and last present (non-Absent) value, 0 if none.
func first(v []int64) int64 {
	for _, x := range v {
		if x != series.Absent {
			return x
		}
	}
	return 0
}

func last(v []int64) int64 {
	for i := len(v) - 1; i >= 0; i-- {
		if v[i] != series.Absent {
			return v[i]
		}
	}
	return 0
}
