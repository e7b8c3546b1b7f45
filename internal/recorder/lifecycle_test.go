package recorder

import (
	"context"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/symbolize"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// exitSoonTruth is what testdata/exit_soon.cc holds at its exit.
var exitSoonTruth = []site{
	{"keep_malloc", 4_194_304, 4_194_304},
	{"keep_new", 4_194_304, 4_194_304},
	{"leaf_malloc", 100_000, 100_000},
}

// builtProfile builds the session's profile now.
func builtProfile(t *testing.T, s *Session) *profile.Profile {
	t.Helper()
	p, err := s.Profile()
	if err != nil {
		t.Fatalf("profile: %v", err)
	}
	built, err := pprofout.Build(p)
	if err != nil {
		t.Fatalf("build profile: %v", err)
	}
	return built
}

// TestPidExitKeptEveryTime: a --pid target that allocates a known amount and
// exits shortly after has its heap at exit in the profile, exactly, every
// time (issue 14: the session could stop and the profile be built before the
// exited target's state was kept, about one run in five).
func TestPidExitKeptEveryTime(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "exit_soon.cc")
	const runs = 50
	// One symbol cache for all runs, so each run does not parse libc's
	// debug information again (~600 ms).
	syms := symbolize.NewCache(symbolize.Options{})
	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"glibc", nil},
		{"jemalloc", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			for i := 0; i < runs; i++ {
				prog := testprog.Start(t, bin, tc.env, "--hold", "20")
				prog.Expect(t, "READY")
				s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{prog.Pid()}, Symbols: syms})
				if err != nil {
					t.Fatalf("run %d: start: %v", i, err)
				}
				prog.Send(t, "go")
				reason := s.Wait(context.Background(), 20*time.Second)
				p := builtProfile(t, s)
				s.Close()
				prog.Cmd.Wait()
				if reason != "all targets exited" {
					t.Fatalf("run %d: session ended with %q, want all targets exited", i, reason)
				}
				checkExact(t, p, exitSoonTruth)
				if t.Failed() {
					t.Fatalf("run %d of %d: the exited target's heap is not in the profile exactly", i+1, runs)
				}
			}
			t.Logf("%d runs, %v per run, exact every time", runs, time.Since(start)/runs)
		})
	}
}
