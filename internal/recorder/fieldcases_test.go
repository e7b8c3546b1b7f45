package recorder

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
)

// fcSite is the truth a field-case program states about one function: the
// live bytes of the blocks allocated under it, within [min, max] (min ==
// max where the size is exact).
type fcSite struct {
	fn       string // C name, or the last path segment of a Rust name
	min, max int64
	// callers, if set, must follow fn on each of its stacks, in this
	// order (not necessarily adjacent).
	callers []string
}

// fieldCase is a program of testdata/ modelled on one of the field cases
// (../shared/field-cases): built, then recorded at --sample-rate 1.
type fieldCase struct {
	name  string
	build func(t *testing.T) []string // the command line to record
	truth []fcSite
	// unloads: the program unloads a library whose frames the profile
	// needs, which the profile must report as kept.
	unloads bool
}

var fieldCases = []fieldCase{
	{"glibc-helpers", func(t *testing.T) []string {
		return []string{testprog.Build(t, "fc_libc.c", "-O2")}
	}, []fcSite{
		{"fc_strdup", 50_001, 50_001, nil},
		{"fc_asprintf", 60_001, 60_001, nil},
		{"fc_getline", 40_001, 80_122, nil},
		{"fc_memstream", 30_001, 60_002, nil},
		{"fc_direct", 20_000, 20_000, nil},
	}, false},
	{"libstdc++-strings", func(t *testing.T) []string {
		return []string{testprog.Build(t, "fc_cxx.cc", "-O2")}
	}, []fcSite{
		{"fc_string", 70_033, 70_033, nil},
		{"fc_append", 100_033, 200_033, nil},
		{"fc_vector", 100_024, 100_024, nil},
	}, false},
	{"rust-legacy-mangling", func(t *testing.T) []string {
		return []string{buildRust(t)}
	}, rustTruth, false},
	{"rust-v0-mangling", func(t *testing.T) []string {
		return []string{buildRust(t, "-C", "symbol-mangling-version=v0")}
	}, rustTruth, false},
	{"dlopen-dlclose-plugin", buildDlclose, []fcSite{
		{"plug_inner", 3 * 1 << 20, 3 * 1 << 20, []string{"plug_outer", "main"}},
	}, true},
}

// rustTruth is what testdata/fc_rust.rs states.
var rustTruth = []fcSite{
	{"f_vec", 2_097_152, 2_097_152, nil},
	{"f_shrunk", 777, 777, nil},
	{"f_boxes", 102_800, 102_800, nil},
	{"f_string", 123_456, 123_456, nil},
}

// rustcPath finds rustc: on $PATH (Debian's rustc, which make deps
// installs), else rustup's default location.
func rustcPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("rustc"); err == nil {
		return p
	}
	home, _ := os.UserHomeDir()
	for _, p := range []string{filepath.Join(home, ".cargo/bin/rustc"), "/root/.cargo/bin/rustc"} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	t.Fatalf("rustc not found on $PATH nor in ~/.cargo/bin: run make deps (it installs Debian's rustc)")
	return ""
}

// buildRust compiles testdata/fc_rust.rs with rustc -O -g (as a user
// builds a release binary with debug info) plus extra flags.
func buildRust(t *testing.T, extra ...string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "fc_rust")
	args := append([]string{"-O", "-g", "-o", out}, extra...)
	args = append(args, testprog.Testdata("fc_rust.rs"))
	if b, err := exec.Command(rustcPath(t), args...).CombinedOutput(); err != nil {
		t.Fatalf("rustc %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return out
}

// buildDlclose builds testdata/fc_dlmain.c and its plugin fc_plugin.c (no
// frame pointers).
func buildDlclose(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	lib := filepath.Join(dir, "libfc_plugin.so")
	cmd := exec.Command("gcc", "-g", "-O2", "-fomit-frame-pointer", "-shared", "-fPIC", "-o", lib, testprog.Testdata("fc_plugin.c"))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build plugin: %v\n%s", err, b)
	}
	return []string{testprog.Build(t, "fc_dlmain.c", "-O2", "-rdynamic", "-ldl"), lib}
}

// inOrder tells whether want is a subsequence of frames.
func inOrder(frames, want []string) bool {
	for _, name := range frames {
		if len(want) == 0 {
			break
		}
		if frameIs(name, want[0]) {
			want = want[1:]
		}
	}
	return len(want) == 0
}

// frameIs tells whether a function name (C, C++ or demangled Rust) is fn.
func frameIs(name, fn string) bool {
	return name == fn || strings.HasSuffix(name, "::"+fn)
}

// mangled tells whether a function name was left mangled.
func mangled(name string) bool {
	return strings.HasPrefix(name, "_Z") || strings.HasPrefix(name, "_R")
}

// fcModes are the stack modes the field cases run in: cfi (the default,
// the CFI walk in BPF) and dwarf (stack copies unwound in memprof). auto
// takes frame pointers for these processes, whose own code has them while
// code in the middle of their stacks (glibc, libstdc++, the Rust crate, the
// plugin) has none: it is wrong for them, as documented.
var fcModes = []struct{ mode, skip string }{
	{StackCFI, ""},
	{StackDwarf, ""},
	{StackAuto, "auto mode takes frame pointers for these processes: wrong for mid-stack code without them (use the default, cfi)"},
}

// TestFieldCases records each field-case program at --sample-rate 1 and
// checks, per stack mode: every live byte sits on a stack reaching main (or
// start_thread) with no [truncated] frame, each stated block is under its
// calling function with the stated live bytes, and no function name is left
// mangled (C++, Rust legacy and v0). The plugin case also checks that frames
// of a library unloaded (dlclose) before the profile is taken are
// symbolized, in the second profile of the session (after the first let the
// symbolizer release unloaded mappings that no sample refers to).
func TestFieldCases(t *testing.T) {
	testprog.RequireRoot(t)
	for _, fc := range fieldCases {
		t.Run(fc.name, func(t *testing.T) {
			argv := fc.build(t)
			for _, m := range fcModes {
				t.Run(m.mode, func(t *testing.T) {
					if m.skip != "" {
						t.Skip(m.skip)
					}
					p := record(t, Options{SampleRate: 1, Command: argv, StackMode: m.mode}, func(s *Session) {
						if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
							t.Fatalf("session ended with %q", r)
						}
						// A first profile lets the symbolizers release the
						// unloaded mappings no sample refers to; the one
						// checked is the second, so a mapping released
						// while samples refer to it shows.
						if _, err := s.Profile(); err != nil {
							t.Fatal(err)
						}
					})
					checkFieldCase(t, p, fc.truth)
					if kept, _ := pprofoutComment(p, "unloaded_mappings_kept"); fc.unloads && (kept == "" || kept == "0") {
						t.Errorf("profile reports %q unloaded mappings kept, want at least 1 (the plugin)", kept)
					}
					if lost, ok := pprofoutComment(p, "lost_unloaded_mappings"); ok {
						t.Errorf("profile reports %s unloaded mappings dropped, want none", lost)
					}
				})
			}
		})
	}
}

func checkFieldCase(t *testing.T, p *profile.Profile, truth []fcSite) {
	t.Helper()
	inuseIdx := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			inuseIdx = i
		}
	}
	if inuseIdx < 0 {
		t.Fatal("profile has no inuse_space")
	}
	credited := map[string]int64{}
	var total, rooted, preMainBytes int64
	bad := map[string]int64{}
	for _, smp := range p.Sample {
		v := smp.Value[inuseIdx]
		f := frames(smp)
		for _, name := range f {
			if mangled(name) {
				t.Errorf("function name left mangled: %s", name)
			}
		}
		if v == 0 {
			continue
		}
		total += v
		reaches, preMain := false, false
		for _, name := range f {
			switch name {
			case "main", "start_thread":
				reaches = true
			case "_dl_init":
				preMain = true
			}
		}
		if preMain && !reaches {
			// A constructor run by ld.so before main (libstdc++'s
			// emergency exception pool): its stack cannot reach main.
			// The walk ends in [truncated] at ld.so's entry code
			// (_dl_start_user), which has no CFI; counted apart.
			preMainBytes += v
			total -= v
			continue
		}
		if reaches && (len(f) == 0 || f[len(f)-1] != "[truncated]") {
			rooted += v
		} else {
			bad[strings.Join(f, " <- ")] += v
		}
		// The block is credited to the innermost stated function on its
		// stack: the caller of the allocating library code.
	credit:
		for i, name := range f {
			for _, s := range truth {
				if frameIs(name, s.fn) {
					if !inOrder(f[i+1:], s.callers) {
						t.Errorf("%d B under %s without its callers %v: %s", v, s.fn, s.callers, strings.Join(f, " <- "))
						break credit
					}
					credited[s.fn] += v
					break credit
				}
			}
		}
	}
	if total == 0 {
		t.Fatal("no live bytes recorded")
	}
	t.Logf("live bytes: %d (+%d allocated by constructors before main), on stacks reaching main or start_thread: %d (%.2f%%)", total, preMainBytes, rooted, 100*float64(rooted)/float64(total))
	if rooted != total {
		t.Errorf("%d of %d live bytes on stacks that do not reach main or start_thread (or are truncated), want 0", total-rooted, total)
		keys := make([]string, 0, len(bad))
		for k := range bad {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			t.Logf("  %d B: %s", bad[k], k)
		}
	}
	for _, s := range truth {
		got := credited[s.fn]
		want := fmt.Sprint(s.min)
		if s.max != s.min {
			want = fmt.Sprintf("%d..%d", s.min, s.max)
		}
		if got < s.min || got > s.max {
			t.Errorf("%s: %d live bytes under it, want %s", s.fn, got, want)
		} else {
			t.Logf("%s: %d live bytes under it (truth %s)", s.fn, got, want)
		}
	}
	if t.Failed() {
		for _, smp := range p.Sample {
			if smp.Value[inuseIdx] > 0 {
				t.Logf("sample %v: %s", smp.Value, strings.Join(frames(smp), " <- "))
			}
		}
	}
}
