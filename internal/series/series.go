// Package series keeps the memory of a recording over time: live bytes per
// stack (from memprof's own aggregation of the BPF maps: nothing is asked of
// the target), RSS and RssAnon of each target process and the usage of each
// recorded cgroup, on one time axis whose resolution adapts to the length of
// the recording (at most MaxPoints points: when full, every other point is
// dropped and the interval doubles).
//
// The series travels next to its profile as a sidecar file,
// SidecarPath(profile) (gzipped JSON). The pprof format has no field for it:
// comments are printed verbatim by pprof tools (a few hundred kilobytes of
// encoded numbers would bury the useful ones), and unknown protobuf fields
// are dropped by any tool that rewrites the file. The profile carries a
// comment naming the sidecar, so a report can say when it is missing.
package series

import (
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Version of the sidecar format.
const Version = 1

// MaxPoints bounds the points of a series (the time axis).
const MaxPoints = 256

// MaxStacks bounds the (process, stack) series kept while recording; the
// live bytes of stacks beyond it are summed into Series.Other and counted in
// Series.UntrackedStacks.
const MaxStacks = 20000

// Absent marks a point where the value does not exist (the process was not
// running, the cgroup could not be read).
const Absent = -1

// Series is the time axis of one recording. Every value slice has one
// entry per TimesMS entry; values are bytes, Absent where unknown.
type Series struct {
	Version    int       `json:"version"`
	Start      time.Time `json:"start"`
	SampleRate uint64    `json:"sample_rate"` // bytes between samples; live bytes are unsampled estimates
	IntervalMS int64     `json:"interval_ms"` // spacing of the points at the end of the recording
	TimesMS    []int64   `json:"times_ms"`    // since Start
	Stacks     []Stack   `json:"stacks"`      // per stack, summed over processes
	Processes  []Process `json:"processes"`   // per target process
	Cgroups    []Cgroup  `json:"cgroups"`     // per recorded cgroup
	Other      []int64   `json:"other_inuse"` // live bytes of the untracked stacks
	Untracked  int       `json:"untracked_stacks"`
	ReadErrors int       `json:"read_errors"` // ticks whose heap state could not be read (no point added)
	// ReadMeanMS and ReadMaxMS are the CPU time memprof took to read a
	// point (its own cost; nothing runs in the targets).
	ReadMeanMS float64 `json:"read_mean_ms"`
	ReadMaxMS  float64 `json:"read_max_ms"`
}

// Stack is the live bytes of one stack over time.
type Stack struct {
	Frames []string `json:"frames"` // leaf first, as pprofout.Top renders them
	Pids   []int    `json:"pids"`
	Inuse  []int64  `json:"inuse_bytes"`
}

// Process is one target process's memory over time (from /proc/PID/status).
type Process struct {
	Pid     int     `json:"pid"`
	Comm    string  `json:"comm"`
	RSS     []int64 `json:"rss_bytes"`
	RssAnon []int64 `json:"rss_anon_bytes"`
}

// Cgroup is one recorded cgroup's usage over time (memory.usage_in_bytes or
// memory.current).
type Cgroup struct {
	Path  string  `json:"path"`
	Usage []int64 `json:"usage_bytes"`
}

// Seconds returns the time axis in seconds since Start.
func (s *Series) Seconds() []float64 {
	out := make([]float64, len(s.TimesMS))
	for i, t := range s.TimesMS {
		out[i] = float64(t) / 1000
	}
	return out
}

// TotalInuse returns the live bytes of all stacks (and Other) at each point;
// Absent where every stack is Absent (no target running).
func (s *Series) TotalInuse() []int64 {
	out := make([]int64, len(s.TimesMS))
	for i := range out {
		out[i] = Absent
	}
	add := func(v []int64) {
		for i := range out {
			if i < len(v) && v[i] != Absent {
				out[i] = max(out[i], 0) + v[i]
			}
		}
	}
	for _, st := range s.Stacks {
		add(st.Inuse)
	}
	add(s.Other)
	return out
}

// Check verifies that every value slice has one entry per time and that
// times increase.
func (s *Series) Check() error {
	n := len(s.TimesMS)
	for i := 1; i < n; i++ {
		if s.TimesMS[i] <= s.TimesMS[i-1] {
			return fmt.Errorf("series: times not increasing at point %d", i)
		}
	}
	bad := func(what string, v []int64) error {
		if len(v) != n {
			return fmt.Errorf("series: %s has %d points, the time axis %d", what, len(v), n)
		}
		return nil
	}
	for i, st := range s.Stacks {
		if err := bad(fmt.Sprintf("stack %d", i), st.Inuse); err != nil {
			return err
		}
	}
	for _, p := range s.Processes {
		if err := bad(fmt.Sprintf("RSS of pid %d", p.Pid), p.RSS); err != nil {
			return err
		}
		if err := bad(fmt.Sprintf("RssAnon of pid %d", p.Pid), p.RssAnon); err != nil {
			return err
		}
	}
	for _, c := range s.Cgroups {
		if err := bad("usage of cgroup "+c.Path, c.Usage); err != nil {
			return err
		}
	}
	if s.Other != nil {
		return bad("other stacks", s.Other)
	}
	return nil
}

// SidecarPath is the series file of a profile: the profile's name with
// ".pb.gz" (or ".pb") replaced by ".series.json.gz" ("heap.pb.gz" ->
// "heap.series.json.gz"; other names get the suffix appended).
func SidecarPath(profile string) string {
	base := profile
	for _, ext := range []string{".pb.gz", ".pb"} {
		if strings.HasSuffix(base, ext) {
			base = strings.TrimSuffix(base, ext)
			break
		}
	}
	return base + ".series.json.gz"
}

// WriteFile writes s gzipped to path atomically (temporary file, rename).
func WriteFile(path string, s *Series) error {
	if err := s.Check(); err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("series: create temporary file for %s: %w", path, err)
	}
	zw := gzip.NewWriter(tmp)
	err = json.NewEncoder(zw).Encode(s)
	if e := zw.Close(); err == nil {
		err = e
	}
	if e := tmp.Chmod(0o644); err == nil {
		err = e
	}
	if e := tmp.Close(); err == nil {
		err = e
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("series: write %s: %w", path, err)
	}
	return nil
}

// MaxFileBytes bounds the decompressed size of a series file ReadFile
// accepts.
const MaxFileBytes = 256 << 20

// ErrNoSeries is returned (wrapped) by ReadFile when the file does not exist.
var ErrNoSeries = errors.New("no series file")

// ReadFile reads and checks a series file written by WriteFile.
func ReadFile(path string) (*Series, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNoSeries, path)
		}
		return nil, fmt.Errorf("series: %w", err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("series: %s is not gzip: %w", path, err)
	}
	// The shape first, streaming (decoding a run of numbers allocates 4 to
	// 16 times its text: 8-byte values, slices doubling as they grow), then
	// the file again to decode it.
	lr := &io.LimitedReader{R: zr, N: MaxFileBytes + 1}
	if err := checkShape(lr); err != nil {
		if lr.N <= 0 {
			return nil, fmt.Errorf("series: %s is larger than %d bytes decompressed", path, MaxFileBytes)
		}
		return nil, fmt.Errorf("series: %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("series: %w", err)
	}
	if err := zr.Reset(f); err != nil {
		return nil, fmt.Errorf("series: %s is not gzip: %w", path, err)
	}
	var s Series
	if err := json.NewDecoder(io.LimitReader(zr, MaxFileBytes+1)).Decode(&s); err != nil {
		return nil, fmt.Errorf("series: decode %s: %w", path, err)
	}
	if s.Version != Version {
		return nil, fmt.Errorf("series: %s has format version %d, this memprof reads %d", path, s.Version, Version)
	}
	if err := s.Check(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &s, nil
}

// Bounds of a series file's shape (checkShape), beyond which it cannot
// have been written by WriteFile.
const (
	maxDepth      = 8       // nesting of objects and arrays (a series has 4)
	maxFrames     = 1024    // frames of a stack (127 addresses, with inlined functions)
	maxElements   = 1 << 24 // elements of all arrays together
	maxArrayOther = MaxStacks
)

// arrayLimit is the most elements the array under key may have.
func arrayLimit(key string) int {
	switch key {
	case "times_ms", "inuse_bytes", "rss_bytes", "rss_anon_bytes", "usage_bytes", "other_inuse":
		return MaxPoints
	case "frames":
		return maxFrames
	}
	return maxArrayOther // stacks, processes, cgroups, pids
}

// checkShape walks the JSON text of a series file token by token and
// refuses it, before anything is decoded, when an array is longer than a
// series can have (arrayLimit: MaxPoints points, MaxStacks stacks), the
// arrays hold more than maxElements elements together, or nesting is deeper
// than maxDepth. Errors name the array. It reads r to its end (or to the
// error); its memory use is constant.
func checkShape(r io.Reader) error {
	type level struct {
		array   bool
		key     string // the object key this container is the value of
		n       int    // elements so far (arrays)
		wantKey bool   // objects: the next token is a key
	}
	dec := json.NewDecoder(r)
	dec.UseNumber()
	var stack []level
	key, total := "", 0
	element := func() error { // a value at the current level
		if len(stack) == 0 {
			return nil
		}
		top := &stack[len(stack)-1]
		if !top.array {
			top.wantKey = true
			return nil
		}
		top.n++
		total++
		if lim := arrayLimit(top.key); top.n > lim {
			return fmt.Errorf("array %q has more than %d elements", top.key, lim)
		}
		if total > maxElements {
			return fmt.Errorf("more than %d array elements", maxElements)
		}
		return nil
	}
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if len(stack) > 0 {
			if top := &stack[len(stack)-1]; !top.array && top.wantKey {
				if k, ok := tok.(string); ok {
					key, top.wantKey = k, false
					continue
				}
			}
		}
		d, isDelim := tok.(json.Delim)
		switch {
		case isDelim && (d == '[' || d == '{'):
			if err := element(); err != nil {
				return err
			}
			if len(stack) >= maxDepth {
				return fmt.Errorf("nested more than %d deep", maxDepth)
			}
			k := ""
			if len(stack) > 0 && !stack[len(stack)-1].array {
				k = key
			}
			stack = append(stack, level{array: d == '[', key: k, wantKey: d == '{'})
		case isDelim: // ']' or '}'
			if len(stack) > 0 {
				stack = stack[:len(stack)-1]
			}
		default:
			if err := element(); err != nil {
				return err
			}
		}
	}
}

// Key identifies a series while recording: one stack of one process, as the
// BPF side numbers it.
type Key struct {
	Pid     uint32
	StackID uint64
}

// ProcPoint is one process's memory at one tick (Absent where unread).
type ProcPoint struct {
	Pid          int
	Comm         string
	RSS, RssAnon int64
}

// Builder accumulates points while recording. It is not safe for concurrent
// use.
type Builder struct {
	start      time.Time
	rate       uint64
	max        int
	interval   time.Duration
	floor      time.Duration
	last       time.Time
	times      []int64
	stacks     map[Key][]int64
	other      []int64
	untracked  map[Key]bool
	procs      map[int]*Process
	cgroups    map[string][]int64
	readErrors int
	costN      int
	costSum    time.Duration
	costMax    time.Duration
}

// NewBuilder starts an empty series at start; interval is the initial
// spacing of points (it doubles each time maxPoints are reached; maxPoints
// <= 1 means MaxPoints).
func NewBuilder(start time.Time, sampleRate uint64, interval time.Duration, maxPoints int) *Builder {
	if maxPoints <= 1 {
		maxPoints = MaxPoints
	}
	if maxPoints%2 == 1 {
		maxPoints++
	}
	return &Builder{start: start, rate: sampleRate, max: maxPoints, interval: interval,
		stacks: map[Key][]int64{}, untracked: map[Key]bool{}, procs: map[int]*Process{}, cgroups: map[string][]int64{}}
}

// Interval is the current spacing of points: the base interval (doubled
// each time the series filled) or the floor set by AtLeast, whichever is
// longer.
func (b *Builder) Interval() time.Duration { return max(b.interval, b.floor) }

// Due reports whether a point is due at now.
func (b *Builder) Due(now time.Time) bool { return b.last.IsZero() || now.Sub(b.last) >= b.Interval() }

// AtLeast sets the floor of the interval to d (a reading that takes long
// must not run back to back); a later, smaller d lowers it again.
func (b *Builder) AtLeast(d time.Duration) { b.floor = d }

// Cost records the CPU time one point took to read.
func (b *Builder) Cost(d time.Duration) {
	b.costN++
	b.costSum += d
	b.costMax = max(b.costMax, d)
}

// ReadError counts a tick whose heap state could not be read.
func (b *Builder) ReadError() { b.readErrors++ }

// Add appends the point at time at: live bytes per key of the processes in
// alive (keys of other processes are Absent at this point), each process's
// memory and each cgroup's usage (Absent where unread).
func (b *Builder) Add(at time.Time, live map[Key]int64, alive map[int]bool, procs []ProcPoint, cgroups map[string]int64) {
	if len(b.times) >= b.max {
		b.halve()
	}
	n := len(b.times)
	t := at.Sub(b.start).Milliseconds()
	if n > 0 && t <= b.times[n-1] {
		t = b.times[n-1] + 1
	}
	b.times = append(b.times, t)
	b.last = at
	other := int64(0)
	for k, v := range live {
		if _, ok := b.stacks[k]; !ok && !b.untracked[k] {
			if len(b.stacks) >= MaxStacks {
				b.untracked[k] = true
			} else {
				b.stacks[k] = filled(n, Absent)
			}
		}
		if b.untracked[k] {
			other += v
		}
	}
	for k, s := range b.stacks {
		v, ok := live[k]
		switch {
		case ok:
		case alive[int(k.Pid)]:
			v = 0
		default:
			v = Absent
		}
		b.stacks[k] = append(s, v)
	}
	if len(b.untracked) > 0 || b.other != nil {
		if b.other == nil {
			b.other = filled(n, 0)
		}
		b.other = append(b.other, other)
	}
	for _, pp := range procs {
		p := b.procs[pp.Pid]
		if p == nil {
			p = &Process{Pid: pp.Pid, RSS: filled(n, Absent), RssAnon: filled(n, Absent)}
			b.procs[pp.Pid] = p
		}
		p.Comm = pp.Comm
	}
	seen := map[int]bool{}
	for _, pp := range procs {
		if seen[pp.Pid] {
			continue
		}
		seen[pp.Pid] = true
		p := b.procs[pp.Pid]
		p.RSS = append(p.RSS, pp.RSS)
		p.RssAnon = append(p.RssAnon, pp.RssAnon)
	}
	for pid, p := range b.procs {
		if !seen[pid] {
			p.RSS = append(p.RSS, Absent)
			p.RssAnon = append(p.RssAnon, Absent)
		}
	}
	for path := range cgroups {
		if _, ok := b.cgroups[path]; !ok {
			b.cgroups[path] = filled(n, Absent)
		}
	}
	for path, u := range b.cgroups {
		v, ok := cgroups[path]
		if !ok {
			v = Absent
		}
		b.cgroups[path] = append(u, v)
	}
}

func filled(n int, v int64) []int64 {
	s := make([]int64, n, n+16)
	for i := range s {
		s[i] = v
	}
	return s
}

// halve keeps the later point of each pair and doubles the interval: the
// points kept are measurements at their own times, not averages.
func (b *Builder) halve() {
	keep := func(v []int64) []int64 {
		out := v[:0]
		for i := 1; i < len(v); i += 2 {
			out = append(out, v[i])
		}
		return out
	}
	b.times = keep(b.times)
	for k, v := range b.stacks {
		b.stacks[k] = keep(v)
	}
	if b.other != nil {
		b.other = keep(b.other)
	}
	for _, p := range b.procs {
		p.RSS, p.RssAnon = keep(p.RSS), keep(p.RssAnon)
	}
	for k, v := range b.cgroups {
		b.cgroups[k] = keep(v)
	}
	b.interval *= 2
}

// Keys lists the keys tracked so far.
func (b *Builder) Keys() []Key {
	out := make([]Key, 0, len(b.stacks))
	for k := range b.stacks {
		out = append(out, k)
	}
	return out
}

// Finish returns the series with keys merged by their frames (frames(k),
// leaf first, as pprofout renders them): the per-process series of one
// stack are summed (Absent only where every one is Absent). Stacks whose
// values are all 0 or Absent are left out, and so are the last points if
// nothing was running any more (every value Absent).
func (b *Builder) Finish(frames func(Key) []string) *Series {
	b.trimTail()
	s := &Series{Version: Version, Start: b.start, SampleRate: b.rate, IntervalMS: b.Interval().Milliseconds(),
		TimesMS: append([]int64{}, b.times...), Other: b.other, Untracked: len(b.untracked), ReadErrors: b.readErrors,
		ReadMaxMS: float64(b.costMax) / 1e6}
	if b.costN > 0 {
		s.ReadMeanMS = float64(b.costSum) / float64(b.costN) / 1e6
	}
	byFrames := map[string]*Stack{}
	keys := b.Keys()
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].Pid != keys[j].Pid {
			return keys[i].Pid < keys[j].Pid
		}
		return keys[i].StackID < keys[j].StackID
	})
	for _, k := range keys {
		v := b.stacks[k]
		nonzero := false
		for _, x := range v {
			if x > 0 {
				nonzero = true
				break
			}
		}
		if !nonzero {
			continue
		}
		f := frames(k)
		id := strings.Join(f, "\x00")
		st := byFrames[id]
		if st == nil {
			st = &Stack{Frames: f, Inuse: filled(len(v), Absent)}
			byFrames[id] = st
			s.Stacks = append(s.Stacks, Stack{})
		}
		st.Pids = appendUnique(st.Pids, int(k.Pid))
		for i, x := range v {
			if x == Absent {
				continue
			}
			if st.Inuse[i] == Absent {
				st.Inuse[i] = 0
			}
			st.Inuse[i] += x
		}
	}
	s.Stacks = s.Stacks[:0]
	for _, st := range byFrames {
		s.Stacks = append(s.Stacks, *st)
	}
	sort.Slice(s.Stacks, func(i, j int) bool {
		return strings.Join(s.Stacks[i].Frames, "\x00") < strings.Join(s.Stacks[j].Frames, "\x00")
	})
	pids := make([]int, 0, len(b.procs))
	for pid := range b.procs {
		pids = append(pids, pid)
	}
	sort.Ints(pids)
	for _, pid := range pids {
		s.Processes = append(s.Processes, *b.procs[pid])
	}
	paths := make([]string, 0, len(b.cgroups))
	for p := range b.cgroups {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		s.Cgroups = append(s.Cgroups, Cgroup{Path: p, Usage: b.cgroups[p]})
	}
	return s
}

func appendUnique(s []int, v int) []int {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

// trimTail drops the trailing points at which every value is Absent.
func (b *Builder) trimTail() {
	n := len(b.times)
	present := func(i int) bool {
		for _, v := range b.stacks {
			if v[i] != Absent {
				return true
			}
		}
		for _, p := range b.procs {
			if p.RSS[i] != Absent {
				return true
			}
		}
		for _, u := range b.cgroups {
			if u[i] != Absent {
				return true
			}
		}
		return false
	}
	for n > 0 && !present(n-1) {
		n--
	}
	if n == len(b.times) {
		return
	}
	b.times = b.times[:n]
	for k, v := range b.stacks {
		b.stacks[k] = v[:n]
	}
	if b.other != nil {
		b.other = b.other[:n]
	}
	for _, p := range b.procs {
		p.RSS, p.RssAnon = p.RSS[:n], p.RssAnon[:n]
	}
	for k, v := range b.cgroups {
		b.cgroups[k] = v[:n]
	}
}
