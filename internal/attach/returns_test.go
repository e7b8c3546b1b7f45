package attach

import (
	"debug/elf"
	"os"
	"testing"
)

func openLib(t *testing.T, path string) *elf.File {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s missing (make deps installs it): %v", path, err)
	}
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func sitesBySymbol(t *testing.T, f *elf.File) map[string]Site {
	t.Helper()
	sites, err := FindSites(f)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]Site{}
	for _, s := range sites {
		out[s.Symbol] = s
	}
	return out
}

// readAtOffset reads n bytes of the file at a file offset.
func readAtOffset(t *testing.T, path string, off uint64, n int) []byte {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	b := make([]byte, n)
	if _, err := fh.ReadAt(b, int64(off)); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRetSitesOperatorNew: every operator new variant that is probed has
// its result taken at ret instructions (no return probe), each site is a
// ret instruction, and every path out was followed.
func TestRetSitesOperatorNew(t *testing.T) {
	for _, lib := range []string{"/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"} {
		f := openLib(t, lib)
		sites := sitesBySymbol(t, f)
		probed := 0
		for _, name := range []string{"_Znwm", "_ZnwmRKSt9nothrow_t", "_ZnwmSt11align_val_t", "_ZnwmSt11align_val_tRKSt9nothrow_t",
			"_Znam", "_ZnamRKSt9nothrow_t", "_ZnamSt11align_val_t", "_ZnamSt11align_val_tRKSt9nothrow_t"} {
			s, ok := sites[name]
			if !ok {
				t.Errorf("%s: %s not found", lib, name)
				continue
			}
			if !s.RetSites {
				t.Errorf("%s: %s may throw but is not taken at its ret instructions", lib, name)
			}
			if s.Thunk {
				continue // jumps to a probed variant
			}
			probed++
			if len(s.Rets) == 0 || s.RetsIncomplete {
				t.Errorf("%s: %s: ret sites %x (incomplete %v), want all found", lib, name, s.Rets, s.RetsIncomplete)
			}
			for _, r := range s.Rets {
				if b := readAtOffset(t, lib, r, 1); b[0] != 0xc3 {
					t.Errorf("%s: %s: ret site %#x holds %#x, not ret", lib, name, r, b[0])
				}
			}
		}
		if probed < 4 {
			t.Errorf("%s: %d probed operator new variants, want at least 4", lib, probed)
		}
		// jemalloc's operator new inlines the fast path and tail-jumps to a
		// slow path: both returns are found.
		if s := sites["_Znwm"]; lib == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2" && len(s.Rets) < 2 {
			t.Errorf("jemalloc _Znwm: ret sites %x, want the fast path's and the slow path's", s.Rets)
		}
		// C functions keep their return probe.
		for name, s := range sites {
			if s.RetSites && !MayThrow(name) {
				t.Errorf("%s: %s taken at ret instructions though it cannot throw", lib, name)
			}
		}
	}
}

// TestTailJumps: glibc's realloc(NULL, n) jumps to malloc and reallocarray
// to realloc through the PLT: those jmp instructions are tail sites.
func TestTailJumps(t *testing.T) {
	lib := "/usr/lib/x86_64-linux-gnu/libc.so.6"
	f := openLib(t, lib)
	sites := sitesBySymbol(t, f)
	for _, name := range []string{"realloc", "reallocarray"} {
		s := sites[name]
		if len(s.Tails) == 0 {
			t.Errorf("%s: no tail jump found", name)
		}
		for _, off := range s.Tails {
			if b := readAtOffset(t, lib, off, 1); b[0] != 0xe9 && b[0] != 0xeb {
				t.Errorf("%s: tail site %#x holds %#x, not a relative jmp", name, off, b[0])
			}
		}
		if s.RetSites {
			t.Errorf("%s: taken at ret instructions, want a return probe instead", name)
		}
	}
}

// TestNoReturnCalls: a path stops at a PLT call of a function that never
// returns, so decoding does not wander into unrelated code.
func TestNoReturnCalls(t *testing.T) {
	f := openLib(t, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
	r := newTextReader(f)
	got := gotSymbols(f)
	found := false
	for slot, name := range got {
		if name == "_ZSt17__throw_bad_allocv" {
			found = slot != 0
		}
	}
	if !found {
		t.Fatal("jemalloc's PLT relocation of std::__throw_bad_alloc not found")
	}
	if !isNoReturn("_ZSt17__throw_bad_allocv") || !isNoReturn("__cxa_throw") || isNoReturn("malloc") {
		t.Error("isNoReturn misclassifies")
	}
	// Some PLT stub of the library resolves to it.
	stub := false
	for _, sec := range f.Sections {
		if sec.Name != ".plt" && sec.Name != ".plt.sec" {
			continue
		}
		for a := sec.Addr; a < sec.Addr+sec.Size; a += 16 {
			stub = stub || r.pltName(a) == "_ZSt17__throw_bad_allocv"
		}
	}
	if !stub {
		t.Error("no PLT stub resolved to std::__throw_bad_alloc")
	}
}
