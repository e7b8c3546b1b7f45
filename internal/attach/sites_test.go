package attach

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
)

const libdir = "/usr/lib/x86_64-linux-gnu/"

func sitesOf(t *testing.T, path string) (map[string]Site, string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatalf("%v (install the Debian package that ships it)", err)
	}
	defer f.Close()
	sites, err := FindSites(f)
	if err != nil {
		t.Fatal(err)
	}
	bySym := map[string]Site{}
	for _, s := range sites {
		for _, n := range s.Names() {
			bySym[n] = s
		}
	}
	return bySym, allocatorName(path, sites)
}

// TestFamilies: tcmalloc and mimalloc export free under several names at one
// address; the site is found, named free, classified by its family, and the
// family's own entry points (tc_*, mi_*) are probed with the right kinds.
func TestFamilies(t *testing.T) {
	for _, tc := range []struct {
		lib, alloc string
		kinds      map[string]Kind // name -> kind, each must be a probed site
		aliases    map[string]string
	}{
		{"libtcmalloc_minimal.so.4", "tcmalloc",
			map[string]Kind{"malloc": Malloc, "free": Free, "calloc": Calloc, "realloc": Realloc, "tc_free_sized": Free, "tc_memalign": Memalign, "_Znwm": Malloc, "tc_posix_memalign": PosixMemalign},
			map[string]string{"tc_free": "free", "cfree": "free", "_ZdlPv": "free", "tc_malloc": "malloc", "_Znwm": "tc_new", "_ZdlPvm": "tc_delete_sized"}},
		{"libtcmalloc.so.4", "tcmalloc",
			map[string]Kind{"malloc": Malloc, "free": Free, "tc_free_sized": Free},
			map[string]string{"tc_free": "free", "_ZdaPv": "free"}},
		{"libmimalloc.so.2", "mimalloc",
			map[string]Kind{"malloc": Malloc, "free": Free, "cfree": Free, "mi_zalloc": Malloc, "mi_malloc_aligned": Malloc, "mi_calloc_aligned": Calloc, "mi_reallocn": Reallocarray, "mi_posix_memalign": PosixMemalign, "mi_free_size": Free},
			map[string]string{"mi_free": "free", "_ZdlPv": "free", "mi_malloc": "malloc", "mi_realloc": "realloc"}},
		{"libjemalloc.so.2", "jemalloc",
			map[string]Kind{"malloc": Malloc, "free": Free, "mallocx": Malloc, "sdallocx": Free},
			nil},
		{"libc.so.6", "glibc",
			map[string]Kind{"malloc": Malloc, "free": Free, "calloc": Calloc},
			map[string]string{"cfree": "free"}},
	} {
		t.Run(tc.lib, func(t *testing.T) {
			sites, alloc := sitesOf(t, libdir+tc.lib)
			if alloc != tc.alloc {
				t.Errorf("allocator %q, want %q", alloc, tc.alloc)
			}
			for name, k := range tc.kinds {
				s, ok := sites[name]
				if !ok {
					t.Errorf("%s: no site", name)
					continue
				}
				// A thunk (mimalloc's cfree and mi_free_size are `jmp
				// mi_free`) is fine: its target is probed.
				if s.Kind != k || (s.Thunk && (name == "malloc" || name == "free")) {
					t.Errorf("%s: kind %v thunk %v, want %v probed", name, s.Kind, s.Thunk, k)
				}
			}
			for alias, canon := range tc.aliases {
				if s := sites[alias]; s.Symbol != canon {
					t.Errorf("%s: site named %q, want %q (aliases %v)", alias, s.Symbol, canon, s.Aliases)
				}
			}
		})
	}
}

// TestMusl: musl's libc (Alpine's allocator) is found and named musl.
func TestMusl(t *testing.T) {
	sites, alloc := sitesOf(t, "/lib/x86_64-linux-musl/libc.so")
	if alloc != "musl" || sites["malloc"].Kind != Malloc || sites["free"].Kind != Free {
		t.Errorf("musl libc: allocator %q, malloc %+v free %+v", alloc, sites["malloc"], sites["free"])
	}
}

// TestPrefixedJemalloc: jemalloc built with --with-jemalloc-prefix=_rjem_ (as
// Rust's jemalloc-sys does) and linked statically into an executable, which
// also keeps glibc's malloc: the prefixed API is found by its family
// (_rjem_mallctl, _rjem_mallocx, ...) and the executable named jemalloc.
func TestPrefixedJemalloc(t *testing.T) {
	lib := testprog.PrefixedJemalloc(t, "_rjem_")
	bin := testprog.Build(t, "alloc_family.c", "-DJE_PREFIX=_rjem_", "-Wl,--whole-archive", lib, "-Wl,--no-whole-archive", "-lm", "-ldl")
	sites, alloc := sitesOf(t, bin)
	if alloc != "jemalloc" {
		t.Errorf("allocator %q, want jemalloc", alloc)
	}
	for name, k := range map[string]Kind{"_rjem_malloc": Malloc, "_rjem_free": Free, "_rjem_calloc": Calloc, "_rjem_realloc": Realloc, "_rjem_mallocx": Malloc, "_rjem_sdallocx": Free, "_rjem_rallocx": Realloc, "_rjem_posix_memalign": PosixMemalign} {
		if s, ok := sites[name]; !ok || s.Kind != k || s.Family != "jemalloc" {
			t.Errorf("%s: site %+v (found %v), want kind %v in the jemalloc family", name, s, ok, k)
		}
	}
	for name := range sites {
		if strings.HasPrefix(name, "_rjem_je_") {
			t.Errorf("jemalloc internal function %s taken for an entry point", name)
		}
	}
}

// TestStrippedStatic: a static executable without a symbol table has no
// allocator memprof can find; the error says why.
func TestStrippedStatic(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "alloc_family.c", "-static")
	if out, err := exec.Command("strip", bin).CombinedOutput(); err != nil {
		t.Fatalf("strip: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	a := New(Programs{})
	defer a.Close()
	var err error
	for i := 0; i < 50; i++ { // until the process has exec'd
		if exe, _ := os.Readlink(filepath.Join(procmaps.ProcRoot, itoa(cmd.Process.Pid), "exe")); exe == bin {
			_, err = a.Process(cmd.Process.Pid)
			break
		}
		sleepShort()
	}
	if err == nil || !strings.Contains(err.Error(), "no allocator found") || !strings.Contains(err.Error(), "stripped") {
		t.Errorf("stripped static executable: error %v, want 'no allocator found' naming stripped executables", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func sleepShort() { time.Sleep(20 * time.Millisecond) }

// TestJemallocPrefixes: a prefix counts when two or more of jemalloc's own
// API names are defined under it (a Rust binary linked with --gc-sections
// keeps only what it calls), never for stray look-alikes.
func TestJemallocPrefixes(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  string
	}{
		{[]string{"je_malloc", "je_free", "je_mallctl", "je_mallocx", "je_sdallocx"}, "je_"},     // Redis
		{[]string{"_rjem_mallocx", "_rjem_sdallocx", "_rjem_rallocx", "_rjem_calloc"}, "_rjem_"}, // Rust, gc-sections
		{[]string{"my_mallocx"}, ""},                                                                        // one name only
		{[]string{"mallctl", "mallocx", "malloc"}, ""},                                                      // unprefixed: cSymbols
		{[]string{"foo_mallctl", "foo_mallctlbymib"}, ""},                                                   // no allocation entry
		{[]string{"_rjem_je_arena_malloc", "_rjem_mallocx", "_rjem_nallocx", "_rjem_je_mallctl"}, "_rjem_"}, // internals ignored
	} {
		defined := map[string]bool{}
		for _, n := range tc.names {
			defined[n] = true
		}
		got := strings.Join(jemallocPrefixes(defined), ",")
		if got != tc.want {
			t.Errorf("%v: prefixes %q, want %q", tc.names, got, tc.want)
		}
	}
}
