package podfind

import (
	"testing"
	"time"
)

// TestProcCache: a container's name and pause verdict are read once while
// its first process stays, read again when it changes, an unnamed one is
// retried after retryUnnamed, and containers gone are forgotten.
func TestProcCache(t *testing.T) {
	c := &procCache{m: map[string]procFacts{}}
	reads := 0
	name := func(n string) func() string { return func() string { reads++; return n } }
	if got := c.name("r\x00a", []int{10, 11}, name("app")); got != "app" || reads != 1 {
		t.Fatalf("first read: %q, %d reads", got, reads)
	}
	if got := c.name("r\x00a", []int{10, 12}, name("other")); got != "app" || reads != 1 {
		t.Errorf("same first process: %q, %d reads; want the cached name, no read", got, reads)
	}
	if got := c.name("r\x00a", []int{20}, name("new")); got != "new" || reads != 2 {
		t.Errorf("restarted (new first process): %q, %d reads; want a new read", got, reads)
	}
	if got := c.name("r\x00b", nil, name("x")); got != "x" || reads != 3 {
		t.Errorf("no process: %q, %d reads", got, reads)
	}
	if c.name("r\x00b", nil, name("y")); reads != 4 {
		t.Errorf("no process: nothing may be cached (%d reads)", reads)
	}
	// unnamed: cached for retryUnnamed only
	c.name("r\x00u", []int{30}, name(""))
	c.name("r\x00u", []int{30}, name(""))
	if reads != 5 {
		t.Errorf("unnamed within retryUnnamed: %d reads, want 5", reads)
	}
	f := c.m["r\x00u"]
	f.nameAt = time.Now().Add(-retryUnnamed - time.Second)
	c.m["r\x00u"] = f
	if got := c.name("r\x00u", []int{30}, name("late")); got != "late" || reads != 6 {
		t.Errorf("unnamed after retryUnnamed: %q, %d reads; want a new read", got, reads)
	}
	pauses := 0
	if !c.pause("r\x00p", []int{40}, func() bool { pauses++; return true }) || !c.pause("r\x00p", []int{40}, func() bool { pauses++; return false }) || pauses != 1 {
		t.Errorf("pause verdict: %d reads, want 1 (cached)", pauses)
	}
	c.keep("r", map[string]*Container{"a": nil})
	if _, ok := c.m["r\x00a"]; !ok || len(c.m) != 1 {
		t.Errorf("after keep(a): %v, want only a", c.m)
	}
}
