package attach

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/memprof/memprof/internal/testprog"
)

// allocatorLib compiles a minimal malloc/free library and returns its bytes.
func allocatorLib(t testing.TB) []byte {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "alloc.c")
	if err := os.WriteFile(src, []byte(`#include <stddef.h>
static char heap[1 << 16];
static size_t used;
void *malloc(size_t n) { void *p = heap + used; used += (n + 15) & ~(size_t)15; return p; }
void free(void *p) { (void)p; }
`), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "liballoc.so")
	if b, err := exec.Command("gcc", "-O1", "-shared", "-fPIC", "-o", out, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// findSites runs FindSites on an image, failing the test on a panic.
func findSites(t *testing.T, data []byte) ([]Site, error) {
	t.Helper()
	ef, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("FindSites panicked: %v", r)
		}
	}()
	return FindSites(ef)
}

// TestFindSitesHostile: the probe-site finder reads a target's code; a
// compressed .text (debug/elf leaves it without a reader) and 2^50 or
// wrapping symbol and section sizes must neither panic nor allocate them.
func TestFindSitesHostile(t *testing.T) {
	lib := allocatorLib(t)
	good, err := findSites(t, lib)
	if err != nil || len(good) != 2 {
		t.Fatalf("good library: sites %+v, err %v; want malloc and free", good, err)
	}
	t.Run("compressed-text", func(t *testing.T) {
		p := testprog.NewELFPatch(t, lib)
		p.SetSection(".text", testprog.ShFlags, p.SectionFlags(".text")|uint64(elf.SHF_COMPRESSED))
		if _, err := findSites(t, p.Data); err == nil {
			t.Error("no error for a compressed .text")
		}
	})
	// Another code section of the same page compressed (found by
	// FuzzFindSites): reading malloc's page for its returns must skip it.
	for _, sect := range []string{".init", ".fini", ".plt"} {
		t.Run("compressed"+sect, func(t *testing.T) {
			p := testprog.NewELFPatch(t, lib)
			p.SetSection(sect, testprog.ShFlags, p.SectionFlags(sect)|uint64(elf.SHF_COMPRESSED))
			p.SetSection(sect, testprog.ShSize, 0x40) // room for the compression header
			sites, err := findSites(t, p.Data)
			if err != nil || len(sites) != 2 {
				t.Errorf("sites %+v, err %v; want malloc and free", sites, err)
			}
		})
	}
	for _, c := range []struct {
		name          string
		sym, sectSize uint64
	}{
		{"symbol-and-section-2^50", 1 << 50, 1 << 50},
		{"symbol-2^50", 1 << 50, 0},
		{"symbol-wraps", ^uint64(0) - 0x100, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := testprog.NewELFPatch(t, lib)
			p.SetSymbolSize("malloc", c.sym)
			if c.sectSize != 0 {
				p.SetSection(".text", testprog.ShSize, c.sectSize)
			}
			sites, err := findSites(t, p.Data)
			t.Logf("sites %+v, err %v", sites, err)
			if err == nil && len(sites) != 2 {
				t.Errorf("%d sites, want malloc and free", len(sites))
			}
		})
	}
}

// FuzzFindSites runs the probe-site finder on arbitrary ELF images (seed
// corpus in testdata/fuzz/FuzzFindSites; `make fuzz` runs it), headers
// unchecked: FindSites itself must not panic.
func FuzzFindSites(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		ef, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			return
		}
		sites, err := FindSites(ef)
		if err != nil {
			return
		}
		for _, s := range sites {
			if s.Offset > maxFunctionBytes {
				t.Fatalf("site %+v beyond the code read", s)
			}
		}
	})
}
