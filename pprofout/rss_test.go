package pprofout

import (
	"math"
	"testing"
)

func TestBuildRSS(t *testing.T) {
	f := &Location{Lines: []Line{{Function: "f"}}}
	g := &Location{Lines: []Line{{Function: "g"}}}
	p := &RSSProfile{SampleRate: 512 << 10, Samples: []RSSSample{
		{Stack: []*Location{f}, Size: 4096, Faulted: 3, Resident: 2, Labels: map[string]string{"pid": "1"}},
		{Stack: []*Location{f}, Size: 4096, Faulted: 1, Resident: 0.5, Labels: map[string]string{"pid": "1"}}, // merged with the first
		{Stack: []*Location{g}, Size: 4096, ResidentBytes: 1000, Labels: map[string]string{"pid": "1"}},
	}}
	out, err := BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	if out.DefaultSampleType != RSSSpace || len(out.SampleType) != 3 || out.SampleType[2].Type != RSSSpace || out.Period != 512<<10 {
		t.Fatalf("sample types %v default %s period %d", out.SampleType, out.DefaultSampleType, out.Period)
	}
	if len(out.Sample) != 2 {
		t.Fatalf("%d samples, want 2 (identical stacks merged)", len(out.Sample))
	}
	scale := 1 / (1 - math.Exp(-4096.0/(512<<10)))
	s := out.Sample[0]
	if want := int64(math.Round(4 * scale)); s.Value[0] != want {
		t.Errorf("faulted_objects %d, want %d", s.Value[0], want)
	}
	if want := int64(math.Round(4 * 4096 * scale)); s.Value[1] != want {
		t.Errorf("faulted_space %d, want %d", s.Value[1], want)
	}
	if want := int64(math.Round(2.5 * 4096 * scale)); s.Value[2] != want {
		t.Errorf("rss_space %d, want %d", s.Value[2], want)
	}
	if v := out.Sample[1].Value; v[0] != 0 || v[1] != 0 || v[2] != 1000 {
		t.Errorf("explicit bucket values %v, want [0 0 1000]", v)
	}
}
