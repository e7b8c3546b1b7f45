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

// TestForwardsOperatorNew: libstdc++'s operator new and its nothrow
// variants forward to malloc (or operator new) through the PLT and keep rbp:
// they are probed at their entry only, no ret instruction; its aligned
// operator new, which keeps the size in rbp around aligned_alloc, and
// jemalloc's operator new, which allocates inline, keep their ret probes.
func TestForwardsOperatorNew(t *testing.T) {
	lib := "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
	sites := sitesBySymbol(t, openLib(t, lib))
	want := map[string]bool{
		"_Znwm": true, "_ZnwmRKSt9nothrow_t": true, "_ZnamRKSt9nothrow_t": true,
		"_ZnwmSt11align_val_t":               false, // writes rbp
		"_ZnwmSt11align_val_tRKSt9nothrow_t": true,  // calls the aligned one through the PLT
		"_ZnamSt11align_val_tRKSt9nothrow_t": true,
	}
	for name, fwd := range want {
		if s := sites[name]; s.Forwards != fwd {
			t.Errorf("libstdc++ %s: forwards %v, want %v", name, s.Forwards, fwd)
		}
	}
	obj := &Object{Sites: make([]Site, 0, len(sites)), Allocator: allocatorName(lib, nil)}
	for _, s := range sites {
		obj.Sites = append(obj.Sites, s)
	}
	obj.Allocator = allocatorName(lib, obj.Sites)
	if !obj.Forwarding() {
		t.Fatalf("libstdc++ classified %q: its forwarders are not used", obj.Allocator)
	}
	a := New(Programs{})
	entries, plain, returns := a.probes(obj)
	if len(returns) != 0 {
		t.Errorf("libstdc++: %d return probes, want none (every operator new may throw)", len(returns))
	}
	for _, p := range entries {
		if p.site.Kind != Free {
			t.Errorf("libstdc++ %s in a link with a return handler", p.site.Symbol)
		}
	}
	rets, fwd := 0, 0
	for _, p := range plain {
		switch {
		case p.cookie&cookieSiteRet != 0:
			rets++
			if p.site.Forwards {
				t.Errorf("ret instruction of forwarding %s probed", p.site.Symbol)
			}
		case p.cookie&cookieForward != 0:
			fwd++
		}
	}
	if p := obj.Plan(); fwd != 5 || p.Forwarded != 5 || p.RetSites != 1 || p.Rets != rets || rets == 0 {
		t.Errorf("libstdc++ plan %+v, %d forward entries, %d ret probes: want 5 forwarders, the aligned new's rets only", p, fwd, rets)
	}
	je := sitesBySymbol(t, openLib(t, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"))
	for _, name := range []string{"_Znwm", "_ZnwmRKSt9nothrow_t", "_ZnwmSt11align_val_t"} {
		if je[name].Forwards {
			t.Errorf("jemalloc %s taken for a forwarder: it allocates inline", name)
		}
	}
}
