package recorder

import (
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/frag"
)

// TestVerdictWithheld: a fragmentation alarm computed from a live size that
// losses undercount is turned into figures only, with the reason; no loss,
// no change.
func TestVerdictWithheld(t *testing.T) {
	if why := liveUndercount(bpfload.Counters{StackLost: 5, EventsLost: 3, AllocsFull: 2}); why != "" {
		t.Errorf("losses that leave live bytes whole give reason %q, want none", why)
	}
	why := liveUndercount(bpfload.Counters{LiveFull: 1234, MissedReturn: 2})
	for _, want := range []string{"1234 sampled blocks not tracked", "2 allocator calls abandoned by an exception or longjmp"} {
		if !strings.Contains(why, want) {
			t.Errorf("reason %q lacks %q", why, want)
		}
	}
	// 100 MiB RSS for 20 MiB live: an alarm, with advice.
	r := FragReport{Scope: "pid 1 (x)", Verdict: frag.Assess(frag.Glibc, 100<<20, 20<<20, nil)}
	if !r.Verdict.Alarm || len(r.Verdict.Advice) == 0 {
		t.Fatalf("verdict %+v, want an alarm with advice", r.Verdict)
	}
	withhold(&r, why)
	v := r.Verdict
	if v.Alarm || v.Advice != nil || r.Withheld != why {
		t.Errorf("withheld verdict %+v (reason %q): want no alarm, no advice, the reason", v, r.Withheld)
	}
	if v.RSS != 100<<20 || v.Live != 20<<20 || v.Ratio != 5 {
		t.Errorf("figures changed: %+v", v)
	}
	for _, want := range []string{"no verdict", "1234 sampled blocks", "RSS 100.0 MiB", "live (estimated) 20.0 MiB", "ratio 5.00"} {
		if !strings.Contains(v.Summary, want) {
			t.Errorf("summary %q lacks %q", v.Summary, want)
		}
	}
	c := FragComments([]FragReport{r})
	if len(c) != 1 || !strings.Contains(c[0], "verdict=withheld") || !strings.Contains(c[0], "alarm=false") {
		t.Errorf("comments %q, want one frag line with verdict=withheld and no alarm", c)
	}
	// Not covered (a Go process): nothing to withhold.
	g := FragReport{Verdict: frag.Assess(frag.Unknown, 100<<20, 0, nil)}
	before := g.Verdict.Summary
	withhold(&g, why)
	if g.Withheld != "" || g.Verdict.Summary != before {
		t.Errorf("an uncovered verdict was changed: %+v", g)
	}
}
