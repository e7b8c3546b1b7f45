package pprofout

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"sort"
	"strings"

	"github.com/google/pprof/profile"
)

// Indexes of the sample values in a profile produced by Build.
const (
	idxAllocObjects = iota
	idxAllocSpace
	idxInuseObjects
	idxInuseSpace
)

// Unsample returns the estimated true object count and bytes for a
// (stack, size) bucket of count sampled allocations of size bytes each under
// Poisson byte sampling with mean rate. It uses the formula of Go's runtime:
// scale = 1/(1-exp(-avg/rate)) with avg = size (the average block size of the
// bucket). The results are rounded to the nearest integer (Go truncates).
// rate <= 1 means every allocation was recorded, so the counts are exact.
// A bucket of zero-sized blocks has count objects and 0 bytes.
func Unsample(count, size, rate uint64) (objects, bytes int64) {
	if count == 0 {
		return 0, 0
	}
	if size == 0 {
		return clampInt64(float64(count)), 0
	}
	if rate <= 1 {
		return clampInt64(float64(count)), clampInt64(float64(count) * float64(size))
	}
	scale := 1 / (1 - math.Exp(-float64(size)/float64(rate)))
	objects = clampInt64(math.Round(float64(count) * scale))
	bytes = clampInt64(math.Round(float64(count) * float64(size) * scale))
	return objects, bytes
}

func clampInt64(f float64) int64 {
	if f >= math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(f)
}

// sampleKey identifies a sample for merging: its stack (Location pointers),
// its block size and its labels.
type sampleKey struct {
	stack  string
	size   uint64
	labels string
}

// mergedSample accumulates the raw counts of samples with one sampleKey.
type mergedSample struct {
	first      *Sample
	allocCount uint64
	inuseCount uint64
}

// builder holds the deduplication tables of one Build call.
type builder struct {
	out       *profile.Profile
	mappings  map[*Mapping]*profile.Mapping
	functions map[[3]string]*profile.Function
	locations map[*Location]*profile.Location
}

// Build converts p into a pprof heap profile laid out the way Go's runtime
// writes heap profiles: sample types alloc_objects/count, alloc_space/bytes,
// inuse_objects/count, inuse_space/bytes (default inuse_space), period type
// space/bytes with Period = SampleRate. Samples identical in stack, labels and
// size are merged before their counts are unsampled with Unsample; samples
// whose counts are all zero are dropped. Each sample carries the string labels
// of Sample.Labels (empty values are omitted: pprof cannot encode them), the
// numeric labels of Sample.NumLabels and the numeric label "bytes" = Size with
// unit "bytes". The result has passed CheckValid.
func Build(p *Profile) (*profile.Profile, error) {
	if p == nil {
		return nil, errors.New("pprofout: build profile: nil Profile")
	}
	out := &profile.Profile{
		SampleType: []*profile.ValueType{
			{Type: "alloc_objects", Unit: "count"},
			{Type: "alloc_space", Unit: "bytes"},
			{Type: "inuse_objects", Unit: "count"},
			{Type: "inuse_space", Unit: "bytes"},
		},
		DefaultSampleType: "inuse_space",
		PeriodType:        &profile.ValueType{Type: "space", Unit: "bytes"},
		Period:            clampInt64(float64(p.SampleRate)),
		DurationNanos:     p.Duration.Nanoseconds(),
		Comments:          append([]string(nil), p.Comments...),
	}
	if !p.Start.IsZero() {
		out.TimeNanos = p.Start.UnixNano()
	}
	b := &builder{
		out:       out,
		mappings:  make(map[*Mapping]*profile.Mapping),
		functions: make(map[[3]string]*profile.Function),
		locations: make(map[*Location]*profile.Location),
	}
	b.addMappings(p)

	// Merge identical samples on their raw counts, keeping first-seen order.
	index := make(map[sampleKey]int)
	var merged []*mergedSample
	for i := range p.Samples {
		s := &p.Samples[i]
		for j, loc := range s.Stack {
			if loc == nil {
				return nil, fmt.Errorf("pprofout: build profile: sample %d has nil location at stack depth %d", i, j)
			}
		}
		k := sampleKey{stack: b.stackKey(s.Stack), size: s.Size, labels: labelKey(s)}
		if n, ok := index[k]; ok {
			merged[n].allocCount += s.AllocCount
			merged[n].inuseCount += s.InuseCount
			continue
		}
		index[k] = len(merged)
		merged = append(merged, &mergedSample{first: s, allocCount: s.AllocCount, inuseCount: s.InuseCount})
	}

	for _, m := range merged {
		if m.allocCount == 0 && m.inuseCount == 0 {
			continue
		}
		s := m.first
		value := make([]int64, 4)
		value[idxAllocObjects], value[idxAllocSpace] = Unsample(m.allocCount, s.Size, p.SampleRate)
		value[idxInuseObjects], value[idxInuseSpace] = Unsample(m.inuseCount, s.Size, p.SampleRate)
		ps := &profile.Sample{Value: value}
		for _, loc := range s.Stack {
			ps.Location = append(ps.Location, b.location(loc))
		}
		setLabels(ps, s.Labels, s.NumLabels, s.Size)
		out.Sample = append(out.Sample, ps)
	}

	if err := out.CheckValid(); err != nil {
		return nil, fmt.Errorf("pprofout: built profile is invalid: %w", err)
	}
	return out, nil
}

// addMappings writes the mapping table in its final order: p.Mappings first,
// then mappings referenced by samples in order of first use.
func (b *builder) addMappings(p *Profile) {
	var order []*Mapping
	seen := make(map[*Mapping]bool)
	add := func(m *Mapping) {
		if m != nil && !seen[m] {
			seen[m] = true
			order = append(order, m)
		}
	}
	for _, m := range p.Mappings {
		add(m)
	}
	explicit := len(order) > 0
	for i := range p.Samples {
		for _, loc := range p.Samples[i].Stack {
			if loc != nil {
				add(loc.Mapping)
			}
		}
	}
	if !explicit {
		for i, m := range order {
			if !looksLikeLibrary(m.File) {
				copy(order[1:i+1], order[:i])
				order[0] = m
				break
			}
		}
	}
	for _, m := range order {
		pm := &profile.Mapping{
			ID:              uint64(len(b.out.Mapping) + 1),
			Start:           m.Start,
			Limit:           m.Limit,
			Offset:          m.Offset,
			File:            m.File,
			BuildID:         m.BuildID,
			HasFunctions:    m.HasFunctions,
			HasFilenames:    m.HasFilenames,
			HasLineNumbers:  m.HasLineNumbers,
			HasInlineFrames: m.HasInlineFrames,
		}
		b.out.Mapping = append(b.out.Mapping, pm)
		b.mappings[m] = pm
	}
}

// looksLikeLibrary reports whether file is a shared object or a pseudo
// mapping ([vdso], [heap], ...) rather than a main executable.
func looksLikeLibrary(file string) bool {
	base := filepath.Base(file)
	return file == "" || strings.HasPrefix(base, "[") || strings.HasPrefix(base, "linux-vdso") ||
		strings.HasSuffix(base, ".so") || strings.Contains(base, ".so.")
}

// stackKey identifies a stack by the identity of its Location pointers.
func (b *builder) stackKey(stack []*Location) string {
	var sb strings.Builder
	for _, loc := range stack {
		fmt.Fprintf(&sb, "%p,", loc)
	}
	return sb.String()
}

// labelKey is a canonical string of a sample's labels.
func labelKey(s *Sample) string {
	var parts []string
	for k, v := range s.Labels {
		if v != "" {
			parts = append(parts, fmt.Sprintf("s%q=%q", k, v))
		}
	}
	for k, v := range s.NumLabels {
		parts = append(parts, fmt.Sprintf("n%q=%d", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func (b *builder) location(loc *Location) *profile.Location {
	if pl, ok := b.locations[loc]; ok {
		return pl
	}
	pl := &profile.Location{
		ID:      uint64(len(b.out.Location) + 1),
		Address: loc.Addr,
	}
	if loc.Mapping != nil {
		pl.Mapping = b.mappings[loc.Mapping]
	}
	for _, ln := range loc.Lines {
		pl.Line = append(pl.Line, profile.Line{Function: b.function(ln), Line: ln.Line})
	}
	b.out.Location = append(b.out.Location, pl)
	b.locations[loc] = pl
	return pl
}

func (b *builder) function(ln Line) *profile.Function {
	sys := ln.SystemName
	if sys == "" {
		sys = ln.Function
	}
	k := [3]string{ln.Function, sys, ln.File}
	if f, ok := b.functions[k]; ok {
		return f
	}
	f := &profile.Function{
		ID:         uint64(len(b.out.Function) + 1),
		Name:       ln.Function,
		SystemName: sys,
		Filename:   ln.File,
	}
	b.out.Function = append(b.out.Function, f)
	b.functions[k] = f
	return f
}

// setLabels gives ps the string labels (empty values left out), the numeric
// labels and the numeric label "bytes" = size (unit bytes) that pprof's
// -tagfocus and the per-size views read.
func setLabels(ps *profile.Sample, labels map[string]string, num map[string]int64, size uint64) {
	for k, v := range labels {
		if v == "" {
			continue
		}
		if ps.Label == nil {
			ps.Label = make(map[string][]string)
		}
		ps.Label[k] = []string{v}
	}
	ps.NumLabel = make(map[string][]int64, len(num)+1)
	for k, v := range num {
		ps.NumLabel[k] = []int64{v}
	}
	ps.NumLabel["bytes"] = []int64{clampInt64(float64(size))}
	ps.NumUnit = map[string][]string{"bytes": {"bytes"}}
}
