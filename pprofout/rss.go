package pprofout

import (
	"errors"
	"fmt"
	"math"

	"github.com/google/pprof/profile"
)

// RSSSample is one (stack, folio size) bucket of sampled page faults of one
// process in an RSS profile (see BuildRSS).
type RSSSample struct {
	Stack []*Location // leaf first: Stack[0] is the faulting instruction
	Size  uint64      // folio bytes: 4096, or 2 MiB for a transparent huge page
	// Faulted is the number of sampled faults during the window; Resident
	// is the part of them (in folios, fractional when part of a folio was
	// given back) still resident at the end.
	Faulted  uint64
	Resident float64
	// ResidentBytes is added to rss_space as is (not unsampled): explicit
	// buckets such as the memory resident before the recording started.
	ResidentBytes int64
	Labels        map[string]string
	NumLabels     map[string]int64
}

// RSSProfile is everything needed to write one RSS profile.
type RSSProfile struct {
	Samples    []RSSSample
	SampleRate uint64 // mean bytes between sampled faults; 1 = every fault
	Profile           // Start, Duration, Comments, Mappings (Samples unused)
}

// RSS sample types, in the order BuildRSS writes them.
const (
	RSSFaultedObjects = "faulted_objects"
	RSSFaultedSpace   = "faulted_space"
	RSSSpace          = "rss_space"
)

// BuildRSS converts p into a pprof profile of resident memory: sample types
// faulted_objects/count (folios faulted in during the window),
// faulted_space/bytes (their bytes) and rss_space/bytes (bytes of them still
// resident at the end, plus explicit buckets; the default), period type
// space/bytes with Period = SampleRate. Sampled counts are unsampled per
// (stack, size) bucket as Go's heap profile does, with Unsample's
// 1/(1-exp(-size/rate)). Labels as Build (plus numeric label "bytes" = folio
// size). The result has passed CheckValid.
func BuildRSS(p *RSSProfile) (*profile.Profile, error) {
	if p == nil {
		return nil, errors.New("pprofout: build RSS profile: nil RSSProfile")
	}
	out := &profile.Profile{
		SampleType: []*profile.ValueType{
			{Type: RSSFaultedObjects, Unit: "count"},
			{Type: RSSFaultedSpace, Unit: "bytes"},
			{Type: RSSSpace, Unit: "bytes"},
		},
		DefaultSampleType: RSSSpace,
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
	// addMappings walks Profile.Samples for referenced mappings: give it
	// the RSS samples' stacks.
	tmp := p.Profile
	tmp.Samples = make([]Sample, len(p.Samples))
	for i := range p.Samples {
		tmp.Samples[i].Stack = p.Samples[i].Stack
	}
	b.addMappings(&tmp)

	type merged struct {
		first    *RSSSample
		faulted  uint64
		resident float64
		extra    int64
	}
	index := map[sampleKey]int{}
	var all []*merged
	for i := range p.Samples {
		s := &p.Samples[i]
		for j, loc := range s.Stack {
			if loc == nil {
				return nil, fmt.Errorf("pprofout: build RSS profile: sample %d has nil location at stack depth %d", i, j)
			}
		}
		k := sampleKey{stack: b.stackKey(s.Stack), size: s.Size, labels: labelKey(&Sample{Labels: s.Labels, NumLabels: s.NumLabels})}
		if n, ok := index[k]; ok {
			all[n].faulted += s.Faulted
			all[n].resident += s.Resident
			all[n].extra += s.ResidentBytes
			continue
		}
		index[k] = len(all)
		all = append(all, &merged{first: s, faulted: s.Faulted, resident: s.Resident, extra: s.ResidentBytes})
	}
	for _, m := range all {
		if m.faulted == 0 && m.resident == 0 && m.extra == 0 {
			continue
		}
		s := m.first
		objs, bytes := Unsample(m.faulted, s.Size, p.SampleRate)
		rss := clampInt64(math.Round(m.resident*float64(s.Size)*unsampleScale(s.Size, p.SampleRate))) + m.extra
		ps := &profile.Sample{Value: []int64{objs, bytes, rss}}
		for _, loc := range s.Stack {
			ps.Location = append(ps.Location, b.location(loc))
		}
		setLabels(ps, s.Labels, s.NumLabels, s.Size)
		out.Sample = append(out.Sample, ps)
	}
	if err := out.CheckValid(); err != nil {
		return nil, fmt.Errorf("pprofout: built RSS profile is invalid: %w", err)
	}
	return out, nil
}

// unsampleScale is Unsample's 1/(1-exp(-size/rate)) (1 for rate <= 1 or
// size 0).
func unsampleScale(size, rate uint64) float64 {
	if rate <= 1 || size == 0 {
		return 1
	}
	return 1 / (1 - math.Exp(-float64(size)/float64(rate)))
}

// WriteRSSFile builds p with BuildRSS and writes it gzipped to path,
// atomically as WriteFile.
func WriteRSSFile(path string, p *RSSProfile) error {
	built, err := BuildRSS(p)
	if err != nil {
		return err
	}
	return writeAtomic(path, built)
}
