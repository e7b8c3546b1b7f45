package rss

import (
	"context"
	"math"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwindtable"
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

// TestStacksDlopen: a plugin without frame pointers loaded with dlopen
// after the start (fc_dlmain.c, fc_plugin.c; 6 x 512 KiB faulted by
// memset under plug_inner <- plug_outer <- main, then unloaded): the
// samples whose walk met the plugin before its table was ready end in a
// [truncated] frame and are counted; every other byte is under the whole
// chain. Nothing is attributed to a wrong caller.
func TestStacksDlopen(t *testing.T) {
	testprog.RequireRoot(t)
	dir := t.TempDir()
	lib := dir + "/libfc_plugin.so"
	if out, err := exec.Command("gcc", "-g", "-O2", "-fomit-frame-pointer", "-shared", "-fPIC", "-o", lib, testprog.Testdata("fc_plugin.c")).CombinedOutput(); err != nil {
		t.Fatalf("build plugin: %v\n%s", err, out)
	}
	bin := testprog.Build(t, "fc_dlmain.c", "-O2", "-rdynamic", "-ldl")
	s, err := Start(context.Background(), Options{SampleRate: 1, Command: []string{bin, lib}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := s.Wait(context.Background(), 30*time.Second); !strings.Contains(r, "status 0") {
		t.Fatalf("fc_dlmain: %s", r)
	}
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	st := s.StackStats()
	if rows, err := pprofout.Top(built, pprofout.RSSSpace, 4); err == nil {
		var b strings.Builder
		pprofout.FormatTop(&b, rows, pprofout.RSSSpace, 8)
		t.Logf("top stacks:\n%s", b.String())
	}
	const truth = 6 * 512 << 10
	has := func(f []string, name string) bool { return slices.Contains(f, name) }
	inPlug := rssWhere(built, func(f []string) bool { return has(f, "plug_inner") })
	full := rssWhere(built, func(f []string) bool { return under(f, "plug_inner", "plug_outer", "main") })
	trunc := rssWhere(built, func(f []string) bool {
		return has(f, "plug_inner") && !under(f, "plug_inner", "plug_outer", "main") && f[len(f)-1] == "[truncated]"
	})
	t.Logf("under plug_inner %.3f MiB (truth 3 + malloc headers): whole chain to main %.3f MiB, truncated %.3f MiB; sampled faults %+v",
		float64(inPlug)/mib, float64(full)/mib, float64(trunc)/mib, st)
	if math.Abs(float64(inPlug)-truth) > 0.03*truth {
		t.Errorf("rss_space under plug_inner %.3f MiB, want 3 within 3%%", float64(inPlug)/mib)
	}
	if wrong := inPlug - full - trunc; wrong != 0 {
		t.Errorf("%d bytes under plug_inner neither under plug_outer <- main nor marked truncated", wrong)
	}
	// Every truncated stack is counted: at rate 1 a sampled fault is a page.
	if trunc > int64(st.Truncated)*pageSize {
		t.Errorf("%d bytes on truncated stacks, but only %d sampled faults counted as truncated", trunc, st.Truncated)
	}
}

// TestStacksPruned: the stacks of a process that exited and was dropped
// (the agent's DropExited) leave uw_stacks, once found unreferenced at two
// prunes in a row, so a long recording does not fill the map.
func TestStacksPruned(t *testing.T) {
	testprog.RequireRoot(t)
	defer func(d time.Duration) { pruneInterval = d }(pruneInterval)
	pruneInterval = 0
	bin := testprog.Build(t, "rss_nofp.c", "-O2", "-fomit-frame-pointer")
	k := startWaiting(t, bin, "4")
	s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{k.cmd.Process.Pid}, DropExited: true, Poll: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	k.run(t)
	count := func() int {
		n := 0
		var key, next uint64
		var cur any
		for s.objs.UwStacks.NextKey(cur, &next) == nil {
			n++
			key = next
			cur = key
		}
		return n
	}
	before := count()
	t0 := time.Now()
	k.stdin.Close()
	k.cmd.Wait()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && count() > 0 {
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("uw_stacks: %d stacks while the process ran, %d %s after it exited and was dropped", before, count(), time.Since(t0).Round(time.Millisecond))
	if before == 0 || count() != 0 {
		t.Errorf("uw_stacks: %d stacks while running, %d after the exit; want some, then none", before, count())
	}
}

// TestStacksCorruptStack: rss_corrupt faults 4,000 pages with rsp and rbp
// pointing into a heap buffer of hostile words (random, pointers into
// itself, a frame-pointer chain looping through it with code addresses,
// self-referencing frames). In both stack modes the walks end (the
// recording ends with the program), the program is unaffected (it checks
// its pages and exits 0), every page is in the profile (rate 1: 4,000 x
// 4096 B under hostile_fault, or [stack unavailable] when the
// frame-pointer stack map's hash slot was taken), and a stack that cannot
// be known complete ends in [truncated] and is counted: every CFI walk from
// hostile_fault (its callers are garbage), and every frame-pointer walk cut
// at the frame limit (a frame-pointer walk that stops at an unreadable
// frame cannot be told from a complete one: the reason CFI is the default).
func TestStacksCorruptStack(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "rss_corrupt.c")
	const pages = 4000
	for _, fp := range []bool{false, true} {
		mode := map[bool]string{false: "cfi", true: "fp"}[fp]
		t.Run(mode, func(t *testing.T) {
			s, err := Start(context.Background(), Options{SampleRate: 1, Command: []string{bin, "4000"}, FramePointers: fp})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if r := s.Wait(context.Background(), 60*time.Second); !strings.Contains(r, "status 0") {
				t.Fatalf("rss_corrupt: %s (want status 0: the walks must not change what it does)", r)
			}
			p, _, err := s.Profile(nil)
			if err != nil {
				t.Fatal(err)
			}
			built, err := pprofout.BuildRSS(p)
			if err != nil {
				t.Fatal(err)
			}
			st := s.StackStats()
			var hostile, unavailable, unmarked, cut int64
			for _, smp := range built.Sample {
				f := frames(smp)
				switch {
				case len(f) > 0 && f[0] == "[stack unavailable]":
					unavailable += smp.Value[1]
				case len(f) > 0 && f[0] == "hostile_fault":
					hostile += smp.Value[1]
					truncated := f[len(f)-1] == "[truncated]"
					if truncated {
						cut += smp.Value[1]
					}
					if !truncated && (!fp || len(smp.Location) >= maxFrames) {
						unmarked += smp.Value[1]
						if unmarked == smp.Value[1] {
							t.Logf("unmarked: %d frames: %s", len(smp.Location), strings.Join(f[:min(len(f), 6)], " <- "))
						}
					}
				}
			}
			t.Logf("%s: faulted under hostile_fault %d pages, [stack unavailable] %d, ending in [truncated] %d; stacks %+v",
				mode, hostile/4096, unavailable/4096, cut/4096, st)
			if got := (hostile + unavailable) / 4096; got < pages || got > pages+16 {
				t.Errorf("%d pages under hostile_fault or [stack unavailable], want %d (+ a few of the C runtime's)", got, pages)
			}
			if unmarked != 0 {
				t.Errorf("%d pages under hostile_fault on stacks not marked [truncated] that cannot be complete", unmarked/4096)
			}
			if cut == 0 || st.Truncated < uint64(cut/4096) {
				t.Errorf("stacks %+v, %d pages on [truncated] stacks: want them counted", st, cut/4096)
			}
		})
	}
}

// TestStacksCorruptStackRescans: rss_corrupt faults 1,500 pages a second
// for about 4 s from a hostile stack whose garbage return addresses mark
// the process for a rescan at nearly every walk, while fc_dlmain (started
// by the session) loads a plugin with dlopen. The corrupt process's
// rescans find its mappings unchanged and back off (unwindtable.
// RescanBackoffMax): the store's rescans stay within the schedule's bound
// for the recording's length (9 in the first 1.275 s, one a second after,
// one for rounding) plus 12 for fc_dlmain (its libraries mapped in its
// first milliseconds, its plugin: each new mapping a rescan that finds a
// change, any other backed off like the corrupt one's) — against one every
// 5 ms without the backoff — while the plugin is still found in time: 3 MiB
// under plug_inner within 3%, as in TestStacksDlopen.
func TestStacksCorruptStackRescans(t *testing.T) {
	testprog.RequireRoot(t)
	dir := t.TempDir()
	lib := dir + "/libfc_plugin.so"
	if out, err := exec.Command("gcc", "-g", "-O2", "-fomit-frame-pointer", "-shared", "-fPIC", "-o", lib, testprog.Testdata("fc_plugin.c")).CombinedOutput(); err != nil {
		t.Fatalf("build plugin: %v\n%s", err, out)
	}
	dlmain := testprog.Build(t, "fc_dlmain.c", "-O2", "-rdynamic", "-ldl")
	corrupt := exec.Command(testprog.Build(t, "rss_corrupt.c"), "6000", "hostile", "1500")
	if err := corrupt.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { corrupt.Process.Kill(); corrupt.Wait() })
	start := time.Now()
	s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{corrupt.Process.Pid}, Command: []string{dlmain, lib}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	started := time.Since(start)
	if r := s.Wait(context.Background(), 30*time.Second); !strings.Contains(r, "status 0") {
		t.Fatalf("fc_dlmain: %s", r)
	}
	if err := corrupt.Wait(); err != nil {
		t.Fatalf("rss_corrupt: %v (want status 0: the walks must not change what it does)", err)
	}
	elapsed := time.Since(start)
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	st := s.objs.store.Stats()
	w, err := unwindtable.ReadWalkStats(s.objs.UwStats)
	if err != nil {
		t.Fatal(err)
	}
	const truth = 6 * 512 << 10
	inPlug := rssWhere(built, func(f []string) bool { return slices.Contains(f, "plug_inner") })
	bound := uint64(9+int(elapsed/unwindtable.RescanBackoffMax)+1) + 12
	t.Logf("started in %v; %v: %d walks met no known mapping; %d rescans asked for: %d rescans (%d found nothing new), %d deferred; bound %d (without the backoff ~%d); under plug_inner %.3f MiB (truth 3)",
		started.Round(time.Millisecond), elapsed.Round(time.Millisecond), w.NoMapping, st.RescanPrompts, st.Rescans, st.RescansUnchanged, st.RescansDeferred, bound,
		int(elapsed/unwindtable.StaleInterval), float64(inPlug)/mib)
	// Each of those walks marks its process: without the backoff a rescan
	// at every turn of the loop (every 5 ms while marks come).
	if w.NoMapping <= 10*bound || st.RescansDeferred == 0 {
		t.Errorf("%d walks met no mapping, %d rescans deferred: the corrupt stack did not exercise the backoff (want over %d walks, some deferred)", w.NoMapping, st.RescansDeferred, 10*bound)
	}
	if st.Rescans > bound {
		t.Errorf("%d rescans in %v, want at most %d", st.Rescans, elapsed, bound)
	}
	if st.RescanPrompts != st.Rescans+st.RescansDeferred {
		t.Errorf("rescan figures %+v: want prompts = rescans + deferred", st)
	}
	if math.Abs(float64(inPlug)-truth) > 0.03*truth {
		t.Errorf("rss_space under plug_inner %.3f MiB, want 3 within 3%%", float64(inPlug)/mib)
	}
}
