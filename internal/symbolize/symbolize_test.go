package symbolize

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// prog is a running test program that printed its capture lines.
type prog struct {
	argv  []string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   map[string][]string // tag -> fields after the tag
	lines chan string
	done  chan error
}

// start runs argv, reads its stdout up to "ready" and registers cleanup.
func start(t *testing.T, argv ...string) *prog {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", argv, err)
	}
	p := &prog{argv: argv, cmd: cmd, stdin: stdin, out: map[string][]string{},
		lines: make(chan string, 1024), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		go func() {
			for range p.lines {
			}
		}()
		err := <-p.done
		p.done <- err
	})
	p.waitReady(t)
	return p
}

// waitReady reads output lines up to the next "ready".
func (p *prog) waitReady(t *testing.T) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("%v exited before printing ready; output so far %v", p.argv, p.out)
			}
			if l == "ready" {
				return
			}
			f := strings.Fields(l)
			if len(f) > 1 {
				p.out[f[0]] = f[1:]
			}
		case <-timeout:
			t.Fatalf("%v did not print ready within 10s", p.argv)
		}
	}
}

// addr returns the address printed on the line tagged tag.
func (p *prog) addr(t *testing.T, tag string) uint64 {
	t.Helper()
	f, ok := p.out[tag]
	if !ok {
		t.Fatalf("program printed no %q line: %v", tag, p.out)
	}
	a, err := strconv.ParseUint(strings.TrimPrefix(f[0], "0x"), 16, 64)
	if err != nil {
		t.Fatalf("bad address on %q line: %v", tag, f)
	}
	return a
}

func (p *prog) field(t *testing.T, tag string, i int) string {
	t.Helper()
	f := p.out[tag]
	if i >= len(f) {
		t.Fatalf("%q line has no field %d: %v", tag, i, f)
	}
	return f[i]
}

func (p *prog) intField(t *testing.T, tag string, i int) int64 {
	t.Helper()
	n, err := strconv.ParseInt(p.field(t, tag, i), 10, 64)
	if err != nil {
		t.Fatalf("%q line field %d: %v", tag, i, err)
	}
	return n
}

func wantLine(t *testing.T, what string, got pprofout.Line, fn, file string, line int64) {
	t.Helper()
	if got.Function != fn || (file != "" && filepath.Base(got.File) != file) || got.Line != line {
		t.Errorf("%s: got %s (%s) at %s:%d, want %s at %s:%d", what, got.Function, got.SystemName, got.File, got.Line, fn, file, line)
	}
}

func locate1(t *testing.T, p *Process, a uint64) *pprofout.Location {
	t.Helper()
	l := p.Locate([]uint64{a})[0]
	if l.Addr != a {
		t.Fatalf("Location.Addr = %#x, want %#x", l.Addr, a)
	}
	if l.Mapping == nil {
		t.Fatalf("address %#x has no mapping", a)
	}
	return l
}

func snapshot(t *testing.T, c *Cache, pid int) *Process {
	t.Helper()
	p, err := c.Snapshot(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// readelfBuildID is the build ID binutils reports for path.
func readelfBuildID(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("readelf", "-n", path).CombinedOutput()
	if err != nil {
		t.Fatalf("readelf -n %s: %v\n%s", path, err, out)
	}
	m := regexp.MustCompile(`Build ID: ([0-9a-f]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("readelf -n %s shows no build ID", path)
	}
	return string(m[1])
}

// checkMain asserts the captures of sym_main.c and that no object failed.
func checkMain(t *testing.T, pr *prog, p *Process, bin string) {
	t.Helper()
	checkMainFrames(t, pr, p, bin)
	if errs := p.Errors(); len(errs) > 0 {
		t.Errorf("Errors() = %v, want none", errs)
	}
}

// checkMainFrames asserts the captures of sym_main.c.
func checkMainFrames(t *testing.T, pr *prog, p *Process, bin string) {
	t.Helper()
	l := locate1(t, p, pr.addr(t, "direct"))
	if len(l.Lines) != 1 {
		t.Fatalf("direct: %d lines %+v, want 1", len(l.Lines), l.Lines)
	}
	wantLine(t, "direct call", l.Lines[0], "sym_direct", "sym_main.c", pr.intField(t, "direct", 2))

	l = locate1(t, p, pr.addr(t, "inline"))
	if len(l.Lines) != 2 {
		t.Fatalf("inline: %d lines %+v, want 2 (inlined callee, caller)", len(l.Lines), l.Lines)
	}
	wantLine(t, "inlined frame", l.Lines[0], "sym_inlined", "sym_main.c", pr.intField(t, "inline", 2))
	wantLine(t, "inlining caller", l.Lines[1], "sym_outer", "sym_main.c", pr.intField(t, "inline", 4))

	// A function's entry address +1 (as a return address) is in that function.
	l = locate1(t, p, pr.addr(t, "func")+1)
	if len(l.Lines) == 0 || l.Lines[0].Function != "sym_direct" {
		t.Errorf("function address: got %+v, want sym_direct", l.Lines)
	}
	if l.Mapping.File != bin {
		t.Errorf("mapping file %q, want %q", l.Mapping.File, bin)
	}
}

func TestPIE(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c", "-pie", "-fPIE", "-Wl,--build-id=sha1")
	pr := start(t, bin)
	c := NewCache(Options{})
	p := snapshot(t, c, pr.cmd.Process.Pid)
	checkMain(t, pr, p, bin)

	ms := p.Mappings()
	if len(ms) < 2 || ms[0].File != bin {
		t.Fatalf("Mappings()[0] = %+v, want the executable %s first (of %d)", ms[0], bin, len(ms))
	}
	m := ms[0]
	if want := readelfBuildID(t, bin); m.BuildID != want {
		t.Errorf("build ID %q, readelf says %q", m.BuildID, want)
	}
	if !m.HasFunctions || !m.HasFilenames || !m.HasLineNumbers {
		t.Errorf("executable with DWARF: flags %+v, want all true", m)
	}
	// The mapping matches /proc/PID/maps exactly (offset included).
	maps, err := procmaps.Read(pr.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, x := range maps {
		if x.Start == m.Start && x.End == m.Limit && x.Offset == m.Offset && x.Exec() {
			found = true
		}
	}
	if !found {
		t.Errorf("mapping %x-%x@%x not in /proc/PID/maps", m.Start, m.Limit, m.Offset)
	}

	// Stable pointers across calls.
	a := pr.addr(t, "direct")
	l1 := p.Locate([]uint64{a, pr.addr(t, "inline")})
	l2 := p.Locate([]uint64{a})
	if l1[0] != l2[0] || l1[0].Mapping != l1[1].Mapping {
		t.Errorf("same address or mapping gave different pointers")
	}

	// libc, through its .dynsym (Debian's libc has no .symtab).
	l := locate1(t, p, pr.addr(t, "libc")+1)
	if len(l.Lines) == 0 || !strings.Contains(l.Lines[0].Function, "malloc") {
		t.Errorf("&malloc in libc: got %+v, want a malloc symbol", l.Lines)
	}
	if !strings.Contains(l.Mapping.File, "libc") || l.Mapping.BuildID == "" {
		t.Errorf("libc mapping %+v, want libc with a build ID", l.Mapping)
	}

	// Cross-check every byte of the executable's text against binutils
	// addr2line (functions and lines, inlined frames included).
	checkAddr2line(t, p, m, bin, bin, 1)
}

// checkAddr2line compares Locate with `addr2line -f -i` over the mapping.
//
// Two differences are not errors, checked against `nm -S` of symFile (the
// file holding the symbol table): a different alias of the same symbol
// address (glibc's memcpy/memmove, __GI_ names), and addresses in the
// padding after a function's end, where addr2line guesses the preceding
// function and Locate says nothing (a return address is never there).
func checkAddr2line(t *testing.T, p *Process, m *pprofout.Mapping, bin, symFile string, step uint64) {
	t.Helper()
	syms := nmSymbols(t, symFile)
	var addrs, vaddrs []uint64
	var args []string
	args = append(args, "-f", "-i", "-e", bin)
	base := vbase(t, bin)
	for a := m.Start + 1; a < m.Limit && len(addrs) < 5000; a += step {
		addrs = append(addrs, a)
		vaddrs = append(vaddrs, a-1-m.Start+m.Offset+base)
		// For gcc output p_vaddr - p_offset is 0 (PIE) or the load base (non-PIE).
		args = append(args, fmt.Sprintf("%#x", a-1-m.Start+m.Offset+base))
	}
	// addr2line -a prints each address, then one or more (function,
	// file:line) pairs, innermost first.
	args = append([]string{"-a"}, args...)
	out, err := exec.Command("addr2line", args...).Output()
	if err != nil {
		t.Fatalf("addr2line: %v", err)
	}
	type fr struct {
		fn   string
		line int64
	}
	var want [][]fr
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	for i := 0; i < len(lines); i++ {
		if strings.HasPrefix(lines[i], "0x") {
			want = append(want, nil)
			continue
		}
		if i+1 >= len(lines) {
			break
		}
		fl := lines[i+1]
		if j := strings.Index(fl, " ("); j >= 0 {
			fl = fl[:j]
		}
		n, _ := strconv.ParseInt(fl[strings.LastIndexByte(fl, ':')+1:], 10, 64)
		want[len(want)-1] = append(want[len(want)-1], fr{lines[i], n})
		i++
	}
	if len(want) != len(addrs) {
		t.Fatalf("addr2line gave %d answers for %d addresses", len(want), len(addrs))
	}
	locs := p.Locate(addrs)
	compared, mismatched, padding, aliases := 0, 0, 0, 0
	for i, l := range locs {
		w := want[i]
		// Compare where DWARF decides (line > 0); addr2line's guess for
		// padding after sized symbols without DWARF (crt's _start) is not
		// ground truth.
		if len(w) == 0 || w[0].fn == "??" || w[0].line == 0 {
			continue
		}
		compared++
		ok := len(l.Lines) == len(w)
		for k := 0; ok && k < len(w); k++ {
			ok = l.Lines[k].Function == w[k].fn && l.Lines[k].Line == w[k].line
		}
		if !ok && len(l.Lines) == 0 {
			ok = true
			for _, s := range syms[w[0].fn] {
				if vaddrs[i] >= s[0] && vaddrs[i] < s[0]+s[1] {
					ok = false // inside the function: Locate should have named it
				}
			}
			if ok {
				padding++
			}
		} else if !ok && len(l.Lines) == len(w) {
			ok = true
			for k := range w {
				if l.Lines[k].Line != w[k].line || !sameAddr(syms[l.Lines[k].SystemName], syms[w[k].fn]) {
					ok = false
				}
			}
			if ok {
				aliases++
			}
		}
		if !ok {
			mismatched++
			if mismatched <= 50 {
				t.Logf("%#x: got %+v, addr2line %+v", addrs[i], l.Lines, w)
			}
		}
	}
	t.Logf("addr2line cross-check: %d addresses compared, %d differ (%d more are aliases, %d in padding)", compared, mismatched, aliases, padding)
	if compared < 10 || mismatched > 0 {
		t.Errorf("addr2line cross-check: %d compared, %d differ (want >= 10 compared, 0 differ)", compared, mismatched)
	}
}

// nmSymbols maps each symbol name of path to its [address, size] pairs.
func nmSymbols(t *testing.T, path string) map[string][][2]uint64 {
	t.Helper()
	out, err := exec.Command("nm", "-S", "--defined-only", path).Output()
	if err != nil {
		t.Fatalf("nm -S %s: %v", path, err)
	}
	syms := map[string][][2]uint64{}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 4 {
			continue
		}
		a, err1 := strconv.ParseUint(f[0], 16, 64)
		n, err2 := strconv.ParseUint(f[1], 16, 64)
		name := f[3]
		if i := strings.IndexByte(name, '@'); i > 0 { // versioned: xdr_uint32_t@@GLIBC_2.2.5
			name = name[:i]
		}
		if err1 == nil && err2 == nil {
			syms[name] = append(syms[f[3]], [2]uint64{a, n})
		}
	}
	return syms
}

// sameAddr reports whether two symbols' address lists share an address.
func sameAddr(a, b [][2]uint64) bool {
	for _, x := range a {
		for _, y := range b {
			if x[0] == y[0] {
				return true
			}
		}
	}
	return false
}

// vbase is p_vaddr - p_offset of the executable segment of bin, from readelf.
func vbase(t *testing.T, bin string) uint64 {
	t.Helper()
	out, err := exec.Command("readelf", "-lW", bin).Output()
	if err != nil {
		t.Fatalf("readelf -l %s: %v", bin, err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) >= 8 && f[0] == "LOAD" && strings.Contains(strings.Join(f[6:len(f)-1], ""), "E") {
			off, _ := strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 64)
			va, _ := strconv.ParseUint(strings.TrimPrefix(f[2], "0x"), 16, 64)
			return va - off
		}
	}
	t.Fatalf("readelf -l %s: no executable LOAD segment", bin)
	return 0
}

func TestNonPIE(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c", "-no-pie", "-fno-PIE")
	pr := start(t, bin)
	c := NewCache(Options{})
	p := snapshot(t, c, pr.cmd.Process.Pid)
	checkMain(t, pr, p, bin)
	m := p.Mappings()[0]
	if m.File != bin || m.Start >= 0x1000000 {
		t.Errorf("non-PIE executable mapping %+v, want %s at its link address (< 16 MiB)", m, bin)
	}
	checkAddr2line(t, p, m, bin, bin, 1)
}

func TestCPlusPlus(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_cpp.cc")
	pr := start(t, bin)
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	for _, c := range []struct{ tag, fn, sys string }{
		{"template", "symns::Box<int>::method", "_ZN5symns3BoxIiE6methodEi"},
		{"method", "symns::Widget::run", "_ZN5symns6Widget3runEi"},
		{"static", "symns::Widget::make", "_ZN5symns6Widget4makeEv"},
	} {
		l := locate1(t, p, pr.addr(t, c.tag))
		if len(l.Lines) != 1 {
			t.Errorf("%s: lines %+v, want 1", c.tag, l.Lines)
			continue
		}
		wantLine(t, c.tag, l.Lines[0], c.fn, "sym_cpp.cc", pr.intField(t, c.tag, 1))
		if l.Lines[0].SystemName != c.sys {
			t.Errorf("%s: SystemName %q, want %q", c.tag, l.Lines[0].SystemName, c.sys)
		}
	}
}

// buildLib compiles sym_lib.c into dir/libsym_lib.so.
func buildLib(t *testing.T, dir string, extra ...string) string {
	t.Helper()
	out := filepath.Join(dir, "libsym_lib.so")
	args := append([]string{"-g", "-O1", "-fno-omit-frame-pointer", "-shared", "-fPIC"}, extra...)
	args = append(args, "-o", out, testprog.Testdata("sym_lib.c"))
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, b)
	}
	return out
}

// buildLibMain builds sym_libmain.c linked to libsym_lib.so in libdir.
func buildLibMain(t *testing.T, libdir string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "sym_libmain")
	args := []string{"-g", "-O1", "-fno-omit-frame-pointer", "-o", out, testprog.Testdata("sym_libmain.c"),
		"-L" + libdir, "-Wl,-rpath," + libdir, "-lsym_lib"}
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		t.Fatalf("gcc %v: %v\n%s", args, err, b)
	}
	return out
}

func TestSharedLibrary(t *testing.T) {
	testprog.RequireRoot(t)
	libdir := t.TempDir()
	lib := buildLib(t, libdir)
	bin := buildLibMain(t, libdir)
	pr := start(t, bin)
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	l := locate1(t, p, pr.addr(t, "lib"))
	if len(l.Lines) != 1 {
		t.Fatalf("lib: lines %+v, want 1", l.Lines)
	}
	wantLine(t, "library call", l.Lines[0], "sym_lib_variant_a", "sym_lib.c", pr.intField(t, "lib", 2))
	if l.Mapping.File != lib || !l.Mapping.HasLineNumbers || l.Mapping.BuildID != readelfBuildID(t, lib) {
		t.Errorf("library mapping %+v, want %s with line numbers and its build ID", l.Mapping, lib)
	}
	if ms := p.Mappings(); ms[0].File != bin {
		t.Errorf("Mappings()[0] is %s, want the executable %s", ms[0].File, bin)
	}
	checkAddr2line(t, p, l.Mapping, lib, lib, 1)
}

func run(t *testing.T, dir string, argv ...string) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, b)
	}
}

// splitDebug builds sym_main.c, splits its debug info into a separate file
// and strips the binary. It returns the stripped binary and the debug file.
func splitDebug(t *testing.T, debuglink bool) (bin, dbg string) {
	t.Helper()
	bin = testprog.Build(t, "sym_main.c", "-Wl,--build-id=sha1")
	dir := filepath.Dir(bin)
	dbg = bin + ".debug"
	run(t, dir, "objcopy", "--only-keep-debug", bin, dbg)
	run(t, dir, "objcopy", "--strip-all", bin)
	if debuglink {
		run(t, dir, "objcopy", "--add-gnu-debuglink="+dbg, bin)
	}
	out, err := exec.Command("readelf", "-SW", bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), ".symtab") || strings.Contains(string(out), ".debug_info") {
		t.Fatalf("objcopy --strip-all left .symtab or .debug_info in %s", bin)
	}
	return bin, dbg
}

func TestSeparateDebugFile(t *testing.T) {
	testprog.RequireRoot(t)
	t.Run("debuglink", func(t *testing.T) {
		bin, dbg := splitDebug(t, true)
		// Move the debug file to the .debug/ subdirectory next to the binary.
		sub := filepath.Join(filepath.Dir(bin), ".debug")
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(dbg, filepath.Join(sub, filepath.Base(dbg))); err != nil {
			t.Fatal(err)
		}
		pr := start(t, bin)
		p := snapshot(t, NewCache(Options{DebugDirs: []string{t.TempDir()}}), pr.cmd.Process.Pid)
		checkMain(t, pr, p, bin)
		if m := p.Mappings()[0]; !m.HasFunctions || !m.HasLineNumbers {
			t.Errorf("mapping flags %+v, want functions and lines from the debug file", m)
		}
	})
	t.Run("build-id", func(t *testing.T) {
		bin, dbg := splitDebug(t, false)
		debugDir := t.TempDir()
		id := readelfBuildID(t, bin)
		p1 := filepath.Join(debugDir, ".build-id", id[:2])
		if err := os.MkdirAll(p1, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(dbg, filepath.Join(p1, id[2:]+".debug")); err != nil {
			t.Fatal(err)
		}
		pr := start(t, bin)
		p := snapshot(t, NewCache(Options{DebugDirs: []string{"/nonexistent", debugDir}}), pr.cmd.Process.Pid)
		checkMain(t, pr, p, bin)
	})
	t.Run("debuglink-bad-crc", func(t *testing.T) {
		bin, dbg := splitDebug(t, true)
		// Same build ID, different bytes: the CRC check must reject it.
		f, err := os.OpenFile(dbg, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.Write([]byte{0})
		f.Close()
		pr := start(t, bin)
		p := snapshot(t, NewCache(Options{DebugDirs: []string{t.TempDir()}}), pr.cmd.Process.Pid)
		m := p.Mappings()[0]
		if m.HasLineNumbers {
			t.Errorf("debug file with a wrong CRC was used: %+v", m)
		}
		l := locate1(t, p, pr.addr(t, "direct"))
		if len(l.Lines) != 0 {
			t.Errorf("stripped binary without a valid debug file gave %+v, want no lines", l.Lines)
		}
	})
}

func TestAfterExit(t *testing.T) {
	testprog.RequireRoot(t)
	libdir := t.TempDir()
	buildLib(t, libdir)
	bin := buildLibMain(t, libdir)
	pr := start(t, bin)
	pid := pr.cmd.Process.Pid
	c := NewCache(Options{})
	p := snapshot(t, c, pid)
	// Let it exit, and delete its files: the snapshot holds them open.
	pr.stdin.Close()
	go func() {
		for range pr.lines {
		}
	}()
	select {
	case err := <-pr.done:
		pr.done <- err
	case <-time.After(10 * time.Second):
		t.Fatal("test program did not exit after stdin closed")
	}
	if procmaps.Alive(pid) {
		t.Fatalf("process %d still alive", pid)
	}
	if err := os.RemoveAll(libdir); err != nil {
		t.Fatal(err)
	}
	os.Remove(bin)
	l := locate1(t, p, pr.addr(t, "lib"))
	if len(l.Lines) != 1 {
		t.Fatalf("after exit: lines %+v, want 1", l.Lines)
	}
	wantLine(t, "library call after exit", l.Lines[0], "sym_lib_variant_a", "sym_lib.c", pr.intField(t, "lib", 2))

	if _, err := c.Snapshot(pid); err == nil || !strings.Contains(err.Error(), strconv.Itoa(pid)) {
		t.Errorf("Snapshot of exited pid %d: err %v, want an error naming the pid", pid, err)
	}
}

// execMapping returns the executable mapping whose file contains substr.
func execMapping(t *testing.T, p *Process, substr string) *pprofout.Mapping {
	t.Helper()
	for _, m := range p.Mappings() {
		if strings.Contains(filepath.Base(m.File), substr) {
			return m
		}
	}
	t.Fatalf("no executable mapping of %q in %d mappings", substr, len(p.Mappings()))
	return nil
}

func TestManyAddresses(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c")
	pr := start(t, bin)
	c := NewCache(Options{})
	p := snapshot(t, c, pr.cmd.Process.Pid)
	libc := execMapping(t, p, "libc.so")
	// 10,000 distinct addresses spread over libc's text.
	var addrs []uint64
	step := (libc.Limit - libc.Start) / 10000
	for i := uint64(0); i < 10000; i++ {
		addrs = append(addrs, libc.Start+1+i*step)
	}
	t0 := time.Now()
	locs := p.Locate(addrs)
	first := time.Since(t0)
	t0 = time.Now()
	again := p.Locate(addrs)
	second := time.Since(t0)
	named := 0
	for i, l := range locs {
		if l != again[i] {
			t.Fatalf("address %#x gave a different *Location on the second call", addrs[i])
		}
		if l.Mapping != libc {
			t.Fatalf("address %#x: mapping %+v, want libc's", addrs[i], l.Mapping)
		}
		if len(l.Lines) > 0 && l.Lines[0].Function != "" {
			named++
		}
	}
	objs, bytes := c.Stats()
	t.Logf("10k libc addresses: first Locate %v, cached %v, %d named; cache %d objects, ~%d KiB (libc has line info: %v)",
		first, second, named, objs, bytes>>10, libc.HasLineNumbers)
	// With libc6-dbg (found by build ID under /usr/lib/debug) every function
	// is known; without it only exported ones (.dynsym, measured here: 31%).
	want := 2500
	if libc.HasLineNumbers {
		want = 9000
	}
	if named < want {
		t.Errorf("only %d of 10000 libc text addresses got a function name, want >= %d (libc line info: %v)", named, want, libc.HasLineNumbers)
	}
	if first > 5*time.Second || second > 100*time.Millisecond {
		t.Errorf("Locate of 10k addresses took %v (cached %v), want < 5s (< 100ms)", first, second)
	}
	if libc.HasLineNumbers {
		// libc6-dbg is installed: compare 2,000 addresses with binutils.
		dbg := filepath.Join("/usr/lib/debug/.build-id", libc.BuildID[:2], libc.BuildID[2:]+".debug")
		checkAddr2line(t, p, libc, libc.File, dbg, (libc.Limit-libc.Start)/2000)
	}
	if objs < 2 || bytes <= 0 {
		t.Errorf("Stats() = %d objects, %d bytes; want >= 2 objects (exe, libc) and > 0 bytes", objs, bytes)
	}
}

func TestLRUBound(t *testing.T) {
	testprog.RequireRoot(t)
	libdir := t.TempDir()
	buildLib(t, libdir)
	bin := buildLibMain(t, libdir)
	pr := start(t, bin)
	c := NewCache(Options{MaxObjects: 1})
	p := snapshot(t, c, pr.cmd.Process.Pid)
	lib := execMapping(t, p, "libsym_lib.so")
	exe := p.Mappings()[0]
	// Alternate between objects so each lookup evicts the other one; the
	// snapshot reparses from the files it holds open.
	for i := 0; i < 3; i++ {
		l := locate1(t, p, pr.addr(t, "lib"))
		p.locs = map[uint64]*pprofout.Location{} // defeat the per-address cache
		if len(l.Lines) != 1 || l.Mapping != lib {
			t.Fatalf("round %d: %+v", i, l.Lines)
		}
		wantLine(t, "library call", l.Lines[0], "sym_lib_variant_a", "sym_lib.c", pr.intField(t, "lib", 2))
		l = locate1(t, p, exe.Start+1)
		if l.Mapping != exe {
			t.Fatalf("round %d: exe address got mapping %+v", i, l.Mapping)
		}
		if n, _ := c.Stats(); n != 1 {
			t.Fatalf("Stats objects = %d with MaxObjects 1", n)
		}
	}
}

func TestOtherMountNamespace(t *testing.T) {
	testprog.RequireRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatalf("unshare (util-linux) is needed for this test: %v", err)
	}
	libdir := t.TempDir()
	lib := buildLib(t, libdir)
	other := buildLib(t, t.TempDir(), "-DSYM_VARIANT=1")
	bin := buildLibMain(t, libdir)
	// In a private mount namespace, variant B is bind-mounted over the path
	// of variant A; the host still sees A there.
	pr := start(t, "unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount --bind "$1" "$2" && exec "$3"`, "sh", other, lib, bin)
	if pr.field(t, "lib", 1) != "sym_lib_variant_b" {
		t.Fatalf("the program did not run with variant B: %v", pr.out)
	}
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	l := locate1(t, p, pr.addr(t, "lib"))
	if len(l.Lines) != 1 {
		t.Fatalf("lines %+v, want 1", l.Lines)
	}
	wantLine(t, "library in another mount namespace", l.Lines[0], "sym_lib_variant_b", "sym_lib.c", pr.intField(t, "lib", 2))
	if l.Mapping.File != lib || l.Mapping.BuildID != readelfBuildID(t, other) {
		t.Errorf("mapping %+v, want path %s with the build ID of the mounted file %s", l.Mapping, lib, other)
	}
}

func TestRefreshAfterDlopen(t *testing.T) {
	testprog.RequireRoot(t)
	lib := buildLib(t, t.TempDir())
	bin := testprog.Build(t, "sym_dlopen.c", "-ldl")
	pr := start(t, bin, lib)
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	exe := p.Mappings()[0]
	before := len(p.Mappings())
	direct := locate1(t, p, pr.addr(t, "direct"))

	if _, err := io.WriteString(pr.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	pr.waitReady(t) // the library is loaded and was called
	la := pr.addr(t, "lib")
	if l := p.Locate([]uint64{la})[0]; l.Mapping != nil {
		t.Fatalf("address in the dlopened library found a mapping before Refresh: %+v", l.Mapping)
	}
	if p.Covers([]uint64{pr.addr(t, "direct"), la}) {
		t.Errorf("Covers: the dlopened library's address is covered before Refresh")
	}
	if err := p.Refresh(); err != nil {
		t.Fatal(err)
	}
	if !p.Covers([]uint64{pr.addr(t, "direct"), la}) {
		t.Errorf("Covers: an address of the executable or of the dlopened library is not covered after Refresh")
	}
	if p.Covers([]uint64{la, 8}) {
		t.Errorf("Covers: address 8 (no mapping) covered")
	}
	ms := p.Mappings()
	if len(ms) != before+1 || ms[0] != exe {
		t.Errorf("after Refresh: %d mappings (want %d), first %+v (want the same *Mapping %+v)", len(ms), before+1, ms[0], exe)
	}
	if again := p.Locate([]uint64{pr.addr(t, "direct")})[0]; again != direct {
		t.Errorf("Refresh changed the *Location of an old address")
	}
	p.locs = map[uint64]*pprofout.Location{} // the pre-Refresh miss was cached
	l := locate1(t, p, la)
	if len(l.Lines) != 1 || l.Mapping.File != lib {
		t.Fatalf("dlopened library: %+v in %+v", l.Lines, l.Mapping)
	}
	wantLine(t, "dlopened library", l.Lines[0], "sym_lib_variant_a", "sym_lib.c", pr.intField(t, "lib", 2))
}

func TestSharedCache(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "sym_main.c")
	pr1, pr2 := start(t, bin), start(t, bin)
	c := NewCache(Options{})
	p1 := snapshot(t, c, pr1.cmd.Process.Pid)
	p2 := snapshot(t, c, pr2.cmd.Process.Pid)
	ids := map[string]bool{}
	for _, m := range append(p1.Mappings(), p2.Mappings()...) {
		ids[m.BuildID] = true
	}
	if n, _ := c.Stats(); n != len(ids) {
		t.Errorf("two processes of the same binary: %d cached objects, want %d (one per build ID)", n, len(ids))
	}
	// Both processes symbolize concurrently from the shared objects.
	addrs := []uint64{pr1.addr(t, "direct"), pr1.addr(t, "inline")}
	done := make(chan struct{})
	go func() {
		defer close(done)
		p1.Locate(addrs)
	}()
	checkMain(t, pr2, p2, bin)
	<-done
	checkMain(t, pr1, p1, bin)
}
