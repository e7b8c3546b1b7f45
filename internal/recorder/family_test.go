package recorder

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

// familyTruth is what testdata/alloc_family.c allocates (see its header).
var familyTruth = []site{
	{"f_small", 1_000_000, 1_000_000},
	{"f_big", 16_777_216, 16_777_216},
	{"f_churn", 0, 50_000_000},
	{"f_calloc", 1_000_000, 1_000_000},
	{"f_realloc", 2_000_000, 0},
}

// familySite is f_family's truth, when the program is built with a family's API.
var familySite = site{"f_family", 400_000, 900_000}

const libdir = "/usr/lib/x86_64-linux-gnu/"

// buildMusl compiles testdata/<src> with musl-gcc (Debian musl-tools).
func buildMusl(t *testing.T, src string, extra ...string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "musl-prog")
	args := append([]string{"-g", "-O1", "-fno-omit-frame-pointer"}, extra...)
	args = append(args, "-o", out, testprog.Testdata(src))
	if b, err := exec.Command("musl-gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("musl-gcc %v: %v\n%s (install the Debian package musl-tools)", args, err, b)
	}
	return out
}

// TestRecordAllocatorFamilies runs the same heap under every common
// allocator, preloaded or linked in, started by memprof: every site is exact
// at --sample-rate 1, the allocator is named right, and the family's own
// API (tc_*, mi_*, prefixed jemalloc's mallocx/sdallocx) is seen too.
func TestRecordAllocatorFamilies(t *testing.T) {
	testprog.RequireRoot(t)
	plain := testprog.Build(t, "alloc_family.c")
	for _, tc := range []struct {
		name   string
		bin    func(t *testing.T) string
		env    []string
		alloc  string // allocator name of an attached object
		family bool   // f_family allocates through the family's API
	}{
		{"tcmalloc-minimal-preload", func(*testing.T) string { return plain }, []string{"LD_PRELOAD=" + libdir + "libtcmalloc_minimal.so.4"}, "tcmalloc", false},
		{"gperftools-tcmalloc-preload", func(*testing.T) string { return plain }, []string{"LD_PRELOAD=" + libdir + "libtcmalloc.so.4"}, "tcmalloc", false},
		{"mimalloc-preload", func(*testing.T) string { return plain }, []string{"LD_PRELOAD=" + libdir + "libmimalloc.so.2"}, "mimalloc", false},
		{"tcmalloc-linked", func(t *testing.T) string {
			return testprog.Build(t, "alloc_family.c", "-DFAMILY_TC", "-Wl,--no-as-needed", libdir+"libtcmalloc_minimal.so.4")
		}, nil, "tcmalloc", true},
		{"mimalloc-linked", func(t *testing.T) string {
			return testprog.Build(t, "alloc_family.c", "-DFAMILY_MI", "-Wl,--no-as-needed", libdir+"libmimalloc.so.2")
		}, nil, "mimalloc", true},
		{"jemalloc-prefixed-static", func(t *testing.T) string {
			lib := testprog.PrefixedJemalloc(t, "_rjem_")
			return testprog.Build(t, "alloc_family.c", "-DJE_PREFIX=_rjem_", "-Wl,--whole-archive", lib, "-Wl,--no-whole-archive", "-lm", "-ldl")
		}, nil, "jemalloc", true},
		{"jemalloc-je-prefixed-static", func(t *testing.T) string { // as upstream Redis builds it
			lib := testprog.PrefixedJemalloc(t, "je_")
			return testprog.Build(t, "alloc_family.c", "-DJE_PREFIX=je_", "-Wl,--whole-archive", lib, "-Wl,--no-whole-archive", "-lm", "-ldl")
		}, nil, "jemalloc", true},
		{"musl-dynamic", func(t *testing.T) string { return buildMusl(t, "alloc_family.c") }, nil, "musl", false},
		{"musl-static", func(t *testing.T) string { return buildMusl(t, "alloc_family.c", "-static") }, nil, "static", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin := tc.bin(t)
			var names []string
			p := record(t, Options{SampleRate: 1, Command: []string{bin}, Env: append(os.Environ(), tc.env...)}, func(s *Session) {
				if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
					t.Fatalf("session ended with %q", r)
				}
				for _, o := range s.Objects() {
					names = append(names, o.Allocator+":"+filepath.Base(o.Path))
				}
			})
			found := false
			for _, n := range names {
				found = found || strings.HasPrefix(n, tc.alloc+":")
			}
			if !found {
				t.Errorf("attached objects %v, none is %s", names, tc.alloc)
			}
			truth := familyTruth
			if tc.family {
				truth = append(append([]site(nil), familyTruth...), familySite)
			}
			checkExact(t, p, truth)
		})
	}
}
