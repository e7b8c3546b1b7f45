package recorder

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
)

// cxxFwdTruth is what testdata/cxx_fwd.cc keeps live, by the first frame of
// the program's own (see its header); leaf: those bytes' first frame is
// that function itself (operator new called from it directly).
// -1: not checked. The strings' buffers are allocated by libstdc++'s
// basic_string code, built without frame pointers: a frame-pointer walk
// (auto mode on this program) cannot get from there to the program's frame,
// whatever probe takes the stack (fpInuse). jemalloc's operator new runs the
// new_handler retry in its own code, which calls its malloc: that block's
// first frame is jemalloc's (jeLeaf).
var cxxFwdTruth = []struct {
	fn                           string
	inuse, leaf, fpInuse, jeLeaf int64
}{
	{"fwd::scalar", 4_000, 4_000, 4_000, 4_000},
	{"fwd::array", 100_000, 100_000, 100_000, 100_000},
	{"fwd::nothrow_scalar", 2_400, 2_400, 2_400, 2_400},
	{"fwd::nothrow_array", 200_000, 200_000, 200_000, 200_000},
	{"fwd::aligned", 409_600, 409_600, 409_600, 409_600},
	{"fwd::aligned_nothrow", 819_200, 819_200, 819_200, 819_200},
	{"fwd::strings", 303_300, 3_200, 3_200, 3_200}, // the buffers' first frame is libstdc++'s
	{"fwd::vectors", 400_240, -1, 400_240, -1},     // 10 x (24-byte vector + 40,000): leaf depends on inlining
	{"fwd::handled", 48 << 20, 48 << 20, 48 << 20, -1},
}

// firstUserFrame names the sample's first frame in namespace fwd ("?" if none).
func firstUserFrame(s *profile.Sample) string {
	for _, loc := range s.Location {
		for _, ln := range loc.Line {
			if ln.Function != nil && strings.HasPrefix(ln.Function.Name, "fwd::") {
				return ln.Function.Name
			}
		}
	}
	return "?"
}

// TestCxxForwardedNew: libstdc++'s operator new variants are probed at their
// entry only and their blocks recorded at the return of the malloc they
// call. At --sample-rate 1 every site's live bytes are exact, under the
// program's own function as first frame (never operator new or malloc),
// and the program — a bad_alloc caught, a nothrow null, a new_handler
// whose retry succeeds — prints what it prints without memprof. Under
// jemalloc (its own operator new, ret probes) the same truth holds.
func TestCxxForwardedNew(t *testing.T) {
	bin := testprog.Build(t, "cxx_fwd.cc")
	plain, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("run without memprof: %v", err)
	}
	want := strings.TrimSpace(string(plain))
	if want != "caught=1 nulls=1 handler=1" {
		t.Fatalf("without memprof the program prints %q", want)
	}
	cases := []struct {
		name, mode          string
		env                 []string
		pid                 bool
		perProbe, noSession bool
	}{
		{"glibc/command-cfi", StackCFI, nil, false, false, false},
		{"glibc/command-auto", StackAuto, nil, false, false, false},
		{"glibc/command-dwarf", StackDwarf, nil, false, false, false},
		{"glibc/pid-multi-links", "", nil, true, false, true},
		{"glibc/pid-perf-event-links", "", nil, true, true, false},
		{"jemalloc/command-cfi", StackCFI, []string{"LD_PRELOAD=" + testprog.Jemalloc}, false, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := privateLibs(t, tc.env)
			var out string
			var p *profile.Profile
			if tc.pid {
				prog := testprog.Start(t, bin, env, "--wait-start", "--wait-end")
				prog.Expect(t, "READY")
				p = record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}, PerProbeLinks: tc.perProbe, NoSession: tc.noSession}, func(s *Session) {
					prog.Send(t, "go")
					out, _ = prog.Until(t, "caught=", time.Minute)
					prog.Expect(t, "DONE")
				})
			} else {
				// Exit status 0: it printed what it prints without memprof.
				var reason string
				p = record(t, Options{SampleRate: 1, StackMode: tc.mode, Command: []string{bin}, Env: append(os.Environ(), env...)}, func(s *Session) {
					reason = s.Wait(context.Background(), 60*time.Second)
				})
				if reason != "command exited with status 0" {
					t.Fatalf("session ended with %q, want the command's clean exit", reason)
				}
				out = want
			}
			if got := strings.TrimSpace(out); got != want {
				t.Errorf("program printed %q under memprof, %q without", got, want)
			}
			inuse := map[string]int64{}
			idx := -1
			for i, st := range p.SampleType {
				if st.Type == "inuse_space" {
					idx = i
				}
			}
			for _, s := range p.Sample {
				inuse[firstUserFrame(s)] += s.Value[idx]
				if len(s.Location) > 0 && len(s.Location[0].Line) > 0 && s.Value[idx] > 0 {
					if leaf := s.Location[0].Line[0].Function.Name; strings.HasPrefix(leaf, "operator new") || leaf == "malloc" || leaf == "aligned_alloc" {
						t.Errorf("%d live bytes under %s with the allocator as first frame %q", s.Value[idx], firstUserFrame(s), leaf)
					}
				}
			}
			leaf := bySite(t, p, "inuse_space")
			for _, c := range cxxFwdTruth {
				wantInuse, wantLeaf := c.inuse, c.leaf
				if tc.mode == StackAuto {
					wantInuse = c.fpInuse
				}
				if tc.env != nil {
					wantLeaf = c.jeLeaf
				}
				if inuse[c.fn] != wantInuse {
					t.Errorf("%s: inuse_space %d, want exactly %d", c.fn, inuse[c.fn], wantInuse)
				}
				if wantLeaf >= 0 && leaf[c.fn] != wantLeaf {
					t.Errorf("%s: inuse_space %d with it as first frame, want exactly %d", c.fn, leaf[c.fn], wantLeaf)
				}
			}
			if v, ok := pprofoutComment(p, "lost_forward_unseen"); ok {
				t.Errorf("lost_forward_unseen=%s: operator new calls whose malloc was not seen", v)
			}
			if t.Failed() {
				t.Logf("inuse by first user frame: %v", inuse)
				t.Logf("inuse by first frame: %v", leaf)
			}
		})
	}
}

// TestCxxForwardedNewOwnSizes: a C++ runtime that memprof takes for a
// libstdc++ (testdata/fwd_header_new.cc, built as libstdc++-fwdheader.so)
// and whose operator new is found forwarding, but which calls malloc twice
// (a 64-byte header it keeps, then the block), has each malloc recorded at
// the size it asked for: at --sample-rate 1 the bytes under each caller of
// new are exact (before, the header was recorded with new's size: 2,000,000
// bytes under f_big for 1,000,640).
func TestCxxForwardedNewOwnSizes(t *testing.T) {
	testprog.RequireRoot(t)
	dir := t.TempDir()
	lib := filepath.Join(dir, "libstdc++-fwdheader.so")
	if b, err := exec.Command("g++", "-g", "-O2", "-fomit-frame-pointer", "-shared", "-fPIC", "-o", lib,
		testprog.Testdata("fwd_header_new.cc")).CombinedOutput(); err != nil {
		t.Fatalf("build library: %v\n%s", err, b)
	}
	bin := testprog.Build(t, "fwd_header_main.cc", "-Wl,--no-as-needed", "-L"+dir, "-l:libstdc++-fwdheader.so", "-Wl,-rpath,"+dir)
	var reason string
	p := record(t, Options{SampleRate: 1, Command: []string{bin}}, func(s *Session) {
		reason = s.Wait(context.Background(), 60*time.Second)
	})
	if reason != "command exited with status 0" {
		t.Fatalf("session ended with %q, want the command's clean exit", reason)
	}
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			idx = i
		}
	}
	inuse := map[string]int64{}
	for _, s := range p.Sample {
		for _, loc := range s.Location {
			for _, ln := range loc.Line {
				if ln.Function != nil && (ln.Function.Name == "f_big()" || ln.Function.Name == "f_big" ||
					ln.Function.Name == "f_obj()" || ln.Function.Name == "f_obj") {
					inuse[strings.TrimSuffix(ln.Function.Name, "()")] += s.Value[idx]
				}
			}
		}
	}
	for fn, want := range map[string]int64{"f_big": 1_000_640, "f_obj": 50_640} {
		if inuse[fn] != want {
			t.Errorf("%s: inuse_space %d, want exactly %d (the header's 64 bytes and the block, per new)", fn, inuse[fn], want)
		}
	}
	if t.Failed() {
		t.Logf("inuse by caller: %v", inuse)
	}
}
