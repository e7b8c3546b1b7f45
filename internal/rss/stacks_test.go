package rss

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// frames lists a sample's function names, leaf first (inlined ones
// included, innermost first).
func frames(s *profile.Sample) []string {
	var out []string
	for _, loc := range s.Location {
		for _, ln := range loc.Line {
			if ln.Function != nil {
				out = append(out, ln.Function.Name)
			}
		}
	}
	return out
}

// rssWhere sums rss_space of the samples whose frames satisfy keep.
func rssWhere(p *profile.Profile, keep func([]string) bool) int64 {
	var n int64
	for _, s := range p.Sample {
		if keep(frames(s)) {
			n += s.Value[2]
		}
	}
	return n
}

// under reports whether names holds chain (leaf first) as consecutive
// frames.
func under(names []string, chain ...string) bool {
	for i := 0; i+len(chain) <= len(names); i++ {
		if slices.Equal(names[i:i+len(chain)], chain) {
			return true
		}
	}
	return false
}

// recordNoFP records rss_nofp (32 MiB faulted in leaf <- mid <- main, all
// without frame pointers) at rate 1.
func recordNoFP(t *testing.T, framePointers bool) (*profile.Profile, StackStats) {
	t.Helper()
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "rss_nofp.c", "-O2", "-fomit-frame-pointer")
	k := startWaiting(t, bin, "32")
	s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{k.cmd.Process.Pid}, FramePointers: framePointers})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	k.run(t)
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	if rows, err := pprofout.Top(built, pprofout.RSSSpace, 3); err == nil {
		var b strings.Builder
		pprofout.FormatTop(&b, rows, pprofout.RSSSpace, 8)
		t.Logf("frame pointers %v: top stacks:\n%s", framePointers, b.String())
	}
	return built, s.StackStats()
}

// TestStacksWithoutFramePointers: code built without frame pointers
// (-O2 -fomit-frame-pointer, rbp used as a general register in the leaf):
// the default (CFI) walk puts every faulted byte under leaf <- mid <- main,
// with no truncated stack. Truth: 32 MiB, 8192 pages, at rate 1.
func TestStacksWithoutFramePointers(t *testing.T) {
	const want = 32 * mib
	built, st := recordNoFP(t, false)
	got := rssWhere(built, func(f []string) bool { return under(f, "leaf", "mid", "main") })
	inLeaf := rssWhere(built, func(f []string) bool { return len(f) > 0 && f[0] == "leaf" })
	t.Logf("CFI walk: rss_space under leaf <- mid <- main %.3f MiB (truth 32), with leaf at the top %.3f MiB; stacks: %+v",
		float64(got)/mib, float64(inLeaf)/mib, st)
	if math.Abs(float64(got)-want) > 0.005*want {
		t.Errorf("rss_space under leaf <- mid <- main %.3f MiB, want 32 within 0.5%%", float64(got)/mib)
	}
	if st.Truncated != 0 || st.Unknown != 0 {
		t.Errorf("stacks %+v: want none truncated or unavailable (the tables are built before the faults)", st)
	}
	// The frame-pointer walk cannot see mid and main (shown for contrast:
	// the reason CFI is the default).
	fp, fst := recordNoFP(t, true)
	t.Logf("frame-pointer walk: under leaf <- mid <- main %.3f MiB; stacks %+v",
		float64(rssWhere(fp, func(f []string) bool { return under(f, "leaf", "mid", "main") }))/mib, fst)
}
