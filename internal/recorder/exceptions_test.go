package recorder

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

// excNewTruth is what testdata/exc_new.cc keeps live (see its header).
var excNewTruth = []site{
	{"exc::after", 100_000, 100_000},
	{"exc::after_nothrow", 200_000, 200_000},
	{"exc::after_aligned", 409_600, 409_600},
	{"exc::after_aligned_nothrow", 819_200, 819_200},
}

var allocEnvs = []struct {
	name string
	env  []string
}{
	{"glibc", nil},
	{"jemalloc", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
}

// privateLibs gives a test target its own copies of the C and C++ runtime
// (and jemalloc): uprobes are per file, and the kernel runs every consumer
// of a probed address for any process that hits it, so another tool's
// return probe on the system libstdc++'s operator new (another memprof
// version running on the machine) would hijack the target's return
// address. The copies keep what is tested to memprof's own probes.
func privateLibs(t *testing.T, env []string) []string {
	t.Helper()
	dir := t.TempDir()
	for _, lib := range []string{"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libjemalloc.so.2"} {
		b, err := os.ReadFile("/usr/lib/x86_64-linux-gnu/" + lib)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dir+"/"+lib, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	out := []string{"LD_LIBRARY_PATH=" + dir}
	for _, e := range env {
		if strings.HasPrefix(e, "LD_PRELOAD=") {
			e = "LD_PRELOAD=" + dir + "/libjemalloc.so.2"
		}
		out = append(out, e)
	}
	return out
}

// TestExceptionsThroughOperatorNew: a program that catches std::bad_alloc
// from operator new (throwing and aligned; the nothrow variants catch it
// inside) runs as without memprof, started by memprof and attached to, and
// its later blocks are exact. A return probe on operator new made it die in
// std::terminate (SIGABRT).
func TestExceptionsThroughOperatorNew(t *testing.T) {
	bin := testprog.Build(t, "exc_new.cc")
	for _, al := range allocEnvs {
		// Stacks taken at a ret instruction: by the frame-pointer walk
		// (auto mode, the program has frame pointers) with the caller put
		// in place of operator new's frame, and copied for CFI unwinding
		// with the registers as they are after the ret.
		for _, mode := range []string{StackCFI, StackAuto, StackDwarf} {
			t.Run(al.name+"/command-"+mode, func(t *testing.T) {
				var reason string
				p := record(t, Options{SampleRate: 1, StackMode: mode, Command: []string{bin}, Env: append(os.Environ(), privateLibs(t, al.env)...)}, func(s *Session) {
					reason = s.Wait(context.Background(), 60*time.Second)
				})
				if reason != "command exited with status 0" {
					t.Fatalf("session ended with %q, want the command's clean exit", reason)
				}
				checkExact(t, p, excNewTruth)
				// The 6 operator new calls left by their exception are
				// abandoned; so are the 6 nothrow calls of libstdc++,
				// whose exception (caught inside them) is allocated by
				// malloc from __cxa_allocate_exception, outside the
				// pending call's functions (jemalloc's nothrow new throws
				// nothing) — except libstdc++'s forwarding variants
				// (all but the aligned ones), whose malloc memprof saw
				// fail: they lose nothing and are not counted. No other
				// call of the program may count.
				v, _ := pprofoutComment(p, "lost_abandoned_call")
				if n, _ := strconv.Atoi(v); n < 6 || n > 12 || (al.env == nil && n != 6) {
					t.Errorf("abandoned calls %q, want 6 to 12 (the failed operator new calls; with libstdc++'s, only its 6 aligned ones)", v)
				}
			})
		}
		for _, links := range []struct {
			name                string
			perProbe, noSession bool
		}{{"pid", false, false}, {"pid-multi-links", false, true}, {"pid-perf-event-links", true, false}} {
			t.Run(al.name+"/"+links.name, func(t *testing.T) {
				prog := testprog.Start(t, bin, privateLibs(t, al.env), "--wait-start", "--wait-end")
				prog.Expect(t, "READY")
				var out map[string]uint64
				p := record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}, PerProbeLinks: links.perProbe, NoSession: links.noSession}, func(s *Session) {
					prog.Send(t, "go")
					out = testprog.KeyValues(prog.Expect(t, "DONE"))
				})
				if out["caught"] != 6 || out["nulls"] != 6 {
					t.Errorf("program output %v, want caught 6 and nulls 6", out)
				}
				checkExact(t, p, excNewTruth)
				// The 6 operator new calls left by their exception are
				// abandoned; so are the 6 nothrow calls of libstdc++,
				// whose exception (caught inside them) is allocated by
				// malloc from __cxa_allocate_exception, outside the
				// pending call's functions (jemalloc's nothrow new throws
				// nothing) — except libstdc++'s forwarding variants
				// (all but the aligned ones), whose malloc memprof saw
				// fail: they lose nothing and are not counted. No other
				// call of the program may count.
				v, _ := pprofoutComment(p, "lost_abandoned_call")
				if n, _ := strconv.Atoi(v); n < 6 || n > 12 || (al.env == nil && n != 6) {
					t.Errorf("abandoned calls %q, want 6 to 12 (the failed operator new calls; with libstdc++'s, only its 6 aligned ones)", v)
				}
			})
		}
	}
}

// TestExceptionsTwoTargets: two targets of one session share libstdc++ and
// the allocator: the kernel runs every consumer of a probed address for any
// process that hits it, so a consumer with a return handler attached for
// one target (a session or return probe) would hijack the other target's
// return address in operator new.
func TestExceptionsTwoTargets(t *testing.T) {
	bin := testprog.Build(t, "exc_new.cc")
	for _, al := range allocEnvs {
		t.Run(al.name, func(t *testing.T) {
			env := privateLibs(t, al.env)
			a := testprog.Start(t, bin, env, "--wait-start", "--wait-end")
			b := testprog.Start(t, bin, env, "--wait-start", "--wait-end")
			a.Expect(t, "READY")
			b.Expect(t, "READY")
			record(t, Options{SampleRate: 1, Pids: []int{a.Pid(), b.Pid()}}, func(s *Session) {
				for _, p := range []*testprog.Proc{a, b} {
					p.Send(t, "go")
					if out := testprog.KeyValues(p.Expect(t, "DONE")); out["caught"] != 6 || out["nulls"] != 6 {
						t.Errorf("process %d output %v, want caught 6 and nulls 6", p.Pid(), out)
					}
				}
			})
		})
	}
}

// TestLongjmpOutOfAllocator: after a siglongjmp out of a signal handler
// raised inside realloc, the thread's later malloc calls — at the same, a
// greater and a smaller stack depth than the abandoned call — are recorded
// exactly, and the abandoned call is counted.
func TestLongjmpOutOfAllocator(t *testing.T) {
	bin := testprog.Build(t, "exc_sigjmp.c")
	for _, al := range allocEnvs {
		for _, depths := range [][2]int{{0, 0}, {0, 5}, {5, 0}} {
			name := al.name + "/bad" + strconv.Itoa(depths[0]) + "-ok" + strconv.Itoa(depths[1])
			t.Run(name, func(t *testing.T) {
				var reason string
				cmd := []string{bin, strconv.Itoa(depths[0]), strconv.Itoa(depths[1])}
				p := record(t, Options{SampleRate: 1, Command: cmd, Env: append(os.Environ(), al.env...)}, func(s *Session) {
					reason = s.Wait(context.Background(), 60*time.Second)
				})
				if reason != "command exited with status 0" {
					t.Fatalf("session ended with %q, want the command's clean exit", reason)
				}
				checkExact(t, p, []site{{"one", 100_000, 100_000}})
				if v, _ := pprofoutComment(p, "lost_abandoned_call"); v != "1" {
					t.Errorf("abandoned calls %q, want 1 (the realloc left by siglongjmp)", v)
				}
			})
		}
	}
}
