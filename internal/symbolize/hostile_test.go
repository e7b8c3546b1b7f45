package symbolize

import (
	"debug/elf"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/internal/testprog"
)

// symAddr is the ELF virtual address of function name in path (nm).
func symAddr(t *testing.T, path, name string) uint64 {
	t.Helper()
	ef, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	syms, _ := ef.Symbols()
	for _, s := range syms {
		if s.Name == name {
			return s.Value
		}
	}
	t.Fatalf("no symbol %s in %s", name, path)
	return 0
}

// hostileCase is a malformed object mapped next to a good executable.
type hostileCase struct {
	name string
	// make writes the hostile object(s) into dir from the good library lib
	// and returns the path to map; after, if set, runs once the program has
	// mapped it (to swap files under it).
	make  func(t *testing.T, dir, lib string) string
	after func(t *testing.T, path string)
	// wantErr is a substring of the error reported for the object ("" when
	// the object may be read without error).
	wantErr string
}

// fuzzInput reads the single []byte value of a committed fuzz corpus file.
func fuzzInput(t *testing.T, target, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "fuzz", target, name))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	q := strings.TrimSuffix(strings.TrimPrefix(lines[len(lines)-1], "[]byte("), ")")
	v, err := strconv.Unquote(q)
	if err != nil {
		t.Fatalf("corpus file %s: %v", name, err)
	}
	return []byte(v)
}

func mkfifo(t *testing.T, path string) {
	t.Helper()
	os.Remove(path)
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestHostileObjects(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c")
	libdir := t.TempDir()
	lib := buildLib(t, libdir)
	patched := func(f func(p *testprog.ELFPatch)) func(t *testing.T, dir, lib string) string {
		return func(t *testing.T, dir, lib string) string {
			p := testprog.ReadELFPatch(t, lib)
			f(p)
			out := filepath.Join(dir, "libhostile.so")
			p.Write(out)
			return out
		}
	}
	cases := []hostileCase{
		{name: "compressed-text", make: patched(func(p *testprog.ELFPatch) {
			p.SetSection(".text", testprog.ShFlags, p.SectionFlags(".text")|uint64(elf.SHF_COMPRESSED))
		}), wantErr: "over memprof's size limit"}, // its "compression header" is code
		{name: "symbol-size-2^50", make: patched(func(p *testprog.ELFPatch) {
			p.SetSymbolSize("sym_lib_entry", 1<<50)
		})},
		{name: "section-size-2^50", make: patched(func(p *testprog.ELFPatch) {
			p.SetSection(".text", testprog.ShSize, 1<<50)
		}), wantErr: "runs past the end of the file"},
		{name: "eh_frame-2^35-sparse", make: func(t *testing.T, dir, lib string) string {
			p := testprog.ReadELFPatch(t, lib)
			off := p.File().Section(".eh_frame").Offset
			p.SetSection(".eh_frame", testprog.ShSize, 1<<35)
			out := filepath.Join(dir, "libhostile.so")
			p.Write(out)
			if err := os.Truncate(out, int64(off)+1<<35); err != nil {
				t.Fatal(err)
			}
			return out
		}, wantErr: "over memprof's size limit"},
		{name: "pt_note-2^50", make: patched(func(p *testprog.ELFPatch) {
			p.SetProgFilesz(elf.PT_NOTE, 1<<50)
		}), wantErr: "runs past the end of the file"},
		{name: "debug_line-dircount-2^45", make: patched(func(p *testprog.ELFPatch) {
			dl := p.SectionBytes(".debug_line")
			if v := int(dl[4]) | int(dl[5])<<8; v != 5 {
				t.Skipf(".debug_line version %d, want 5", v)
			}
			pos := 4 + 2 + 2 + 4 + 5
			opBase := int(dl[pos])
			pos += opBase // opcode_base byte + standard_opcode_lengths
			nfmt := int(dl[pos])
			pos++
			for i := 0; i < 2*nfmt; i++ { // (content type, form) ulebs
				for dl[pos]&0x80 != 0 {
					pos++
				}
				pos++
			}
			copy(dl[pos:], []byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x08}) // uleb128 2^45
		}), wantErr: "malformed line-table headers"},
		{name: "debug_info-sibling-loop", make: func(t *testing.T, dir, lib string) string {
			// The fuzzer-found object whose DW_AT_sibling loops back: reading
			// its units never ended.
			out := filepath.Join(dir, "libloop.so")
			if err := os.WriteFile(out, fuzzInput(t, "FuzzLoadObject", "9e0788d558e297a9"), 0o755); err != nil {
				t.Fatal(err)
			}
			return out
		}, wantErr: "loops back"},
		{name: "absolute-symlink-to-host-fifo", make: func(t *testing.T, dir, lib string) string {
			out := filepath.Join(dir, "liblink.so")
			copyFile(t, lib, out)
			return out
		}, after: func(t *testing.T, path string) {
			// The process (here in the host's root) maps the library; its path
			// then becomes an absolute symlink to a FIFO.
			fifo := filepath.Join(filepath.Dir(path), "host.fifo")
			mkfifo(t, fifo)
			os.Remove(path)
			if err := os.Symlink(fifo, path); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "fifo-replaces-mapped-path", make: func(t *testing.T, dir, lib string) string {
			out := filepath.Join(dir, "libswapped.so")
			copyFile(t, lib, out)
			return out
		}, after: func(t *testing.T, path string) { mkfifo(t, path) }},
		{name: "debuglink-1TiB-sparse", make: func(t *testing.T, dir, lib string) string {
			out := filepath.Join(dir, "libdl.so")
			dbg := filepath.Join(dir, "libdl.debug")
			run(t, dir, "objcopy", "--only-keep-debug", lib, dbg)
			run(t, dir, "objcopy", "--strip-all", "--add-gnu-debuglink="+dbg, lib, out)
			if err := os.Truncate(dbg, 1<<40); err != nil {
				t.Fatal(err)
			}
			return out
		}},
		{name: "debuglink-fifo", make: func(t *testing.T, dir, lib string) string {
			out := filepath.Join(dir, "libdl.so")
			dbg := filepath.Join(dir, "libdl.debug")
			run(t, dir, "objcopy", "--only-keep-debug", lib, dbg)
			run(t, dir, "objcopy", "--strip-all", "--add-gnu-debuglink="+dbg, lib, out)
			mkfifo(t, dbg)
			return out
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := c.make(t, dir, lib)
			pr := start(t, bin, path)
			if c.after != nil {
				c.after(t, path)
			}
			base := pr.addr(t, "mapped1")
			begin := time.Now()
			done := make(chan *Process, 1)
			go func() {
				p, err := NewCache(Options{DebugDirs: []string{t.TempDir()}}).Snapshot(pr.cmd.Process.Pid)
				if err != nil {
					t.Error(err)
				}
				done <- p
			}()
			var p *Process
			select {
			case p = <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("Snapshot did not return within 20s")
			}
			if p == nil {
				return
			}
			defer p.Close()
			// Addresses in the hostile mapping: never a panic, never a hang.
			p.Locate([]uint64{base + 0x1001, base + 0x1100, base + 0x10})
			took := time.Since(begin)
			t.Logf("%s: snapshot and lookups in %v; errors: %v", c.name, took, p.Errors())
			if took > 10*time.Second {
				t.Errorf("took %v, want well under 10s", took)
			}
			// The good executable next to it is symbolized correctly.
			checkMainFrames(t, pr, p, bin)
			var found bool
			for _, err := range p.Errors() {
				if strings.Contains(err.Error(), filepath.Base(path)) {
					found = true
					if c.wantErr != "" && !strings.Contains(err.Error(), c.wantErr) {
						t.Errorf("error for %s = %v, want it to say %q", path, err, c.wantErr)
					}
				}
			}
			if c.wantErr != "" && !found {
				t.Errorf("no error reported naming %s; errors %v", path, p.Errors())
			}
		})
	}
}

// TestMappedLibraryAfterSwap: a library whose path is replaced by a FIFO
// after it was mapped is still read (through /proc/PID/map_files) and
// symbolized with its own functions.
func TestMappedLibraryAfterSwap(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c")
	dir := t.TempDir()
	lib := buildLib(t, dir)
	keep := filepath.Join(t.TempDir(), "orig.so")
	copyFile(t, lib, keep)
	pr := start(t, bin, lib)
	mkfifo(t, lib)
	base := pr.addr(t, "mapped1")
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	l := locate1(t, p, base+symAddr(t, keep, "sym_lib_entry")+1)
	if len(l.Lines) == 0 || l.Lines[len(l.Lines)-1].Function != "sym_lib_entry" {
		t.Errorf("frame in the swapped library: %+v, want sym_lib_entry", l.Lines)
	}
	if errs := p.Errors(); len(errs) != 0 {
		t.Errorf("errors %v", errs)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// TestBuildIDCollision: a second target mapping a file with the victim
// library's build ID but other symbols must not make the victim's frames
// carry the attacker's names (the cache checks content, not only the ID).
func TestBuildIDCollision(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c")
	const id = "0x0123456789abcdef0123456789abcdef01234567"
	vdir, adir := t.TempDir(), t.TempDir()
	victim := buildLib(t, vdir, "-Wl,--build-id="+id)
	attacker := buildLib(t, adir, "-Wl,--build-id="+id, "-DSYM_VARIANT=1")
	if a, b := readelfBuildID(t, victim), readelfBuildID(t, attacker); a != b {
		t.Fatalf("build IDs differ: %s %s", a, b)
	}
	c := NewCache(Options{})
	// The attacker is seen first, so its object would be cached first.
	ap := start(t, bin, attacker)
	pa := snapshot(t, c, ap.cmd.Process.Pid)
	aBase := ap.addr(t, "mapped1")
	if l := locate1(t, pa, aBase+symAddr(t, attacker, "sym_lib_variant_b")+1); len(l.Lines) == 0 || l.Lines[len(l.Lines)-1].Function != "sym_lib_variant_b" {
		t.Fatalf("attacker's own frame: %+v", l.Lines)
	}
	vp := start(t, bin, victim)
	pv := snapshot(t, c, vp.cmd.Process.Pid)
	vBase := vp.addr(t, "mapped1")
	l := locate1(t, pv, vBase+symAddr(t, victim, "sym_lib_variant_a")+1)
	if len(l.Lines) == 0 {
		t.Fatalf("victim's frame not symbolized: %+v", l)
	}
	if got := l.Lines[len(l.Lines)-1].Function; got != "sym_lib_variant_a" {
		t.Errorf("victim's frame is %q, want sym_lib_variant_a (attacker's names leaked through the shared cache)", got)
	}
	if n, _ := c.Stats(); n < 3 {
		t.Errorf("cache holds %d objects, want separate entries for the two libraries", n)
	}
	checkMain(t, vp, pv, bin)
}

// TestDebugFileConfinedToRoot: an absolute symlink inside a target's root
// naming a host file is resolved inside the root, so the host file is never
// opened as the target's debug file.
func TestDebugFileConfinedToRoot(t *testing.T) {
	root := t.TempDir()
	host := t.TempDir()
	// A valid-looking host "debug file" (any ELF will do) the symlink names.
	hostFile := filepath.Join(host, "secret.debug")
	copyFile(t, "/proc/self/exe", hostFile)
	ef, err := elf.Open(hostFile)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	id := "00112233445566778899aabbccddeeff00112233"
	d := filepath.Join(root, "usr/lib/debug/.build-id", id[:2])
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(hostFile, filepath.Join(d, id[2:]+".debug")); err != nil {
		t.Fatal(err)
	}
	// Relative escapes are confined too.
	if err := os.Symlink("../../../../../../../../../../"+hostFile, filepath.Join(root, "usr/lib/debug/rel.debug")); err != nil {
		t.Fatal(err)
	}
	// A host FIFO named the same way would block a plain open forever.
	fifo := filepath.Join(host, "fifo")
	mkfifo(t, fifo)
	if err := os.Symlink(fifo, filepath.Join(root, "usr/lib/debug/fifo.debug")); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"/usr/lib/debug/.build-id/" + id[:2] + "/" + id[2:] + ".debug", "usr/lib/debug/rel.debug", "/usr/lib/debug/fifo.debug"} {
		f, err := targetfs.OpenInRoot(root, rel)
		if err == nil {
			f.Close()
			t.Errorf("OpenInRoot(%s, %s) opened %s: a symlink left the root", root, rel, f.Name())
		}
	}
	if df, _ := findDebugFile(ef, id, "/bin/x", root, []string{"/usr/lib/debug"}); df != nil {
		df.Close()
		t.Errorf("findDebugFile followed an absolute symlink out of the target's root to %s", df.Name())
	}
}
