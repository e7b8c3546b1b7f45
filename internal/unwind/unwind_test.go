package unwind

import (
	"bufio"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
)

// Build modes of the test objects.
const (
	omitFP  = "omit"     // -O2 -fomit-frame-pointer, CFI in .eh_frame
	keepFP  = "keep"     // -O2 -fno-omit-frame-pointer, CFI in .eh_frame
	dwarfFP = "dwarf"    // no frame pointers, CFI only in .debug_frame
	nocfiFP = "nocfi-fp" // frame pointers, no CFI at all
	nocfi   = "nocfi"    // neither frame pointers nor CFI
)

func fpFlags(mode string) []string {
	noTables := []string{"-fno-asynchronous-unwind-tables", "-fno-unwind-tables"}
	switch mode {
	case omitFP:
		return []string{"-O2", "-fomit-frame-pointer"}
	case keepFP:
		return []string{"-O2", "-fno-omit-frame-pointer"}
	case dwarfFP:
		return append([]string{"-O2", "-fomit-frame-pointer"}, noTables...)
	case nocfiFP:
		return append([]string{"-O2", "-fno-omit-frame-pointer", "-g0"}, noTables...)
	case nocfi:
		return append([]string{"-O2", "-fomit-frame-pointer", "-g0"}, noTables...)
	}
	panic("unknown build mode " + mode)
}

// built is one compiled pair: the test library and the program linked to it.
type built struct {
	exe, lib string
}

var (
	buildMu    sync.Mutex
	buildCache = map[string]built{}
)

// buildPair compiles testdata/unw_lib.c as a shared library and
// testdata/unw_chain.c linked against it, each with or without frame
// pointers. Results are shared by the tests of one run (keyed by modes).
func buildPair(t testing.TB, exeMode, libMode string) built {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	key := exeMode + "/" + libMode
	if b, ok := buildCache[key]; ok {
		if _, err := os.Stat(b.exe); err == nil {
			return b
		}
	}
	lib := testprog.Build(t, "unw_lib.c", append(fpFlags(libMode), "-shared", "-fPIC", "-Wl,-soname,unw_lib")...)
	args := append(fpFlags(exeMode), "-Wl,--no-as-needed", lib, "-Wl,-rpath,"+filepath.Dir(lib))
	exe := testprog.Build(t, "unw_chain.c", args...)
	b := built{exe: exe, lib: lib}
	buildCache[key] = b
	return b
}

// target is a running unw_chain blocked in leaf's read(0).
type target struct {
	pid, tid int
	maps     []procmaps.Mapping
}

func startTarget(t testing.TB, exe, mode string) *target {
	t.Helper()
	cmd := exec.Command(exe)
	if mode != "" {
		cmd.Args = append(cmd.Args, mode)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatalf("stdin pipe for %s: %v", exe, err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("stdout pipe for %s: %v", exe, err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s %s: %v", exe, mode, err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		stdin.Close()
		cmd.Wait()
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
	}()
	var s string
	select {
	case s = <-line:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s %s did not print ready within 20s", exe, mode)
	}
	f := strings.Fields(s)
	if len(f) != 2 || f[0] != "ready" {
		t.Fatalf("%s %s printed %q, want \"ready <tid>\"", exe, mode, s)
	}
	tid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("bad tid in %q: %v", s, err)
	}
	maps, err := procmaps.Read(cmd.Process.Pid)
	if err != nil {
		t.Fatalf("read maps of %d: %v", cmd.Process.Pid, err)
	}
	return &target{pid: cmd.Process.Pid, tid: tid, maps: maps}
}

// capture stops thread tid with ptrace, reads its registers and copies up to
// n bytes of stack from SP through /proc/PID/mem, as the BPF side will.
func capture(t testing.TB, pid, tid, n int) (Regs, []byte) {
	t.Helper()
	type result struct {
		regs  Regs
		stack []byte
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // all ptrace requests must come from the tracer thread
		defer runtime.UnlockOSThread()
		var res result
		defer func() { ch <- res }()
		if err := unix.PtraceAttach(tid); err != nil {
			res.err = fmt.Errorf("ptrace attach %d: %w", tid, err)
			return
		}
		defer unix.PtraceDetach(tid)
		var ws unix.WaitStatus
		if _, err := unix.Wait4(tid, &ws, unix.WALL, nil); err != nil {
			res.err = fmt.Errorf("wait for %d to stop: %w", tid, err)
			return
		}
		var r unix.PtraceRegs
		if err := unix.PtraceGetRegs(tid, &r); err != nil {
			res.err = fmt.Errorf("ptrace getregs %d: %w", tid, err)
			return
		}
		res.regs = Regs{IP: r.Rip, SP: r.Rsp, BP: r.Rbp}
		mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
		if err != nil {
			res.err = fmt.Errorf("open mem of %d: %w", pid, err)
			return
		}
		defer mem.Close()
		buf := make([]byte, n)
		got, err := mem.ReadAt(buf, int64(r.Rsp))
		if got == 0 {
			res.err = fmt.Errorf("read stack of %d at %#x: %w", tid, r.Rsp, err)
			return
		}
		res.stack = buf[:got] // a shorter copy when the stack ends sooner, as in BPF
	}()
	res := <-ch
	if res.err != nil {
		t.Fatal(res.err)
	}
	return res.regs, res.stack
}

// symbolizer maps pcs to function names with debug/elf symbol tables.
type symbolizer struct {
	maps []procmaps.Mapping
	syms map[string][]elf.Symbol
	elfs map[string]*elf.File
}

func newSymbolizer(t testing.TB, maps []procmaps.Mapping) *symbolizer {
	s := &symbolizer{maps: maps, syms: map[string][]elf.Symbol{}, elfs: map[string]*elf.File{}}
	for _, m := range maps {
		if !m.Exec() || !m.IsFile() {
			continue
		}
		if _, ok := s.elfs[m.Path]; ok {
			continue
		}
		f, err := elf.Open(m.Path)
		if err != nil {
			t.Fatalf("open %s for symbols: %v", m.Path, err)
		}
		t.Cleanup(func() { f.Close() })
		s.elfs[m.Path] = f
		syms, _ := f.Symbols()
		dyn, _ := f.DynamicSymbols()
		for _, sy := range append(syms, dyn...) {
			if elf.ST_TYPE(sy.Info) == elf.STT_FUNC && sy.Value != 0 {
				s.syms[m.Path] = append(s.syms[m.Path], sy)
			}
		}
	}
	return s
}

// mapping returns the mapping holding pc.
func (s *symbolizer) mapping(pc uint64) *procmaps.Mapping {
	for i := range s.maps {
		if m := &s.maps[i]; m.Start <= pc && pc < m.End {
			return m
		}
	}
	return nil
}

// name returns the function holding pc ("?" if unknown). Return addresses
// are looked up at pc-1 (the call), except for the first frame.
func (s *symbolizer) name(pc uint64, first bool) string {
	if !first {
		pc--
	}
	m := s.mapping(pc)
	if m == nil || !m.IsFile() {
		return "?"
	}
	f := s.elfs[m.Path]
	if f == nil {
		return "?"
	}
	off := pc - m.Start + m.Offset
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD || off < p.Off || off >= p.Off+p.Filesz {
			continue
		}
		va := off - p.Off + p.Vaddr
		for _, sy := range s.syms[m.Path] {
			if sy.Value <= va && va < sy.Value+sy.Size {
				return sy.Name
			}
		}
		return "?"
	}
	return "?"
}

func (s *symbolizer) names(pcs []uint64) []string {
	out := make([]string, len(pcs))
	for i, pc := range pcs {
		out[i] = s.name(pc, i == 0)
	}
	return out
}

// objectOf returns the path of the object holding return address pc.
func (s *symbolizer) objectOf(pc uint64) string {
	if m := s.mapping(pc - 1); m != nil {
		return m.Path
	}
	return ""
}

func (s *symbolizer) inLibc(pc uint64) bool {
	m := s.mapping(pc - 1)
	return m != nil && strings.Contains(filepath.Base(m.Path), "libc.so")
}

func chainWant() []string {
	w := []string{"leaf", "unw_lib_mid", "unw_lib_entry"}
	for range 5 {
		w = append(w, "recurse")
	}
	for i := 8; i >= 1; i-- {
		w = append(w, fmt.Sprintf("level%d", i))
	}
	return append(w, "main")
}

func threadWant() []string {
	return []string{"leaf", "unw_lib_mid", "unw_lib_entry", "tlevel2", "tlevel1", "thread_fn"}
}

// checkStack asserts the full expected chain: libc frames of read(), then
// want exactly, then the process's or thread's start frames, and nothing
// more.
func checkStack(t *testing.T, sym *symbolizer, pcs []uint64, truncated bool, want []string, thread bool) {
	t.Helper()
	names := sym.names(pcs)
	t.Logf("%d frames, truncated=%v: %v", len(pcs), truncated, names)
	if truncated {
		t.Errorf("truncated = true, want a complete stack")
	}
	i := slices.Index(names, "leaf")
	if i < 1 {
		t.Fatalf("leaf not found after the read() frames in %v", names)
	}
	for j := 0; j < i; j++ {
		if !sym.inLibc(pcs[j] + 1) {
			t.Errorf("frame %d (%#x, %s) before leaf is not in libc", j, pcs[j], names[j])
		}
	}
	if len(names) < i+len(want) || !slices.Equal(names[i:i+len(want)], want) {
		t.Fatalf("frames from leaf = %v, want %v then start frames", names[i:], want)
	}
	rest := pcs[i+len(want):]
	if thread {
		// start_thread, clone3: local glibc symbols, so check the object only.
		if len(rest) < 1 || len(rest) > 3 {
			t.Fatalf("%d frames after thread_fn, want 1-3 (start_thread, clone3): %v", len(rest), names[i+len(want):])
		}
		for _, pc := range rest {
			if !sym.inLibc(pc) {
				t.Errorf("frame %#x after thread_fn is not in libc", pc)
			}
		}
		return
	}
	// __libc_start_call_main, __libc_start_main (libc), then _start (exe).
	if len(rest) < 2 || len(rest) > 4 {
		t.Fatalf("%d frames after main, want 2-4 ending in _start: %v", len(rest), names[i+len(want):])
	}
	for _, pc := range rest[:len(rest)-1] {
		if !sym.inLibc(pc) {
			t.Errorf("frame %#x between main and _start is not in libc", pc)
		}
	}
	if last := names[len(names)-1]; last != "_start" {
		t.Errorf("outermost frame is %q, want _start", last)
	}
}

// containsRun reports whether want appears as a contiguous run in names.
func containsRun(names, want []string) bool {
	for i := 0; i+len(want) <= len(names); i++ {
		if slices.Equal(names[i:i+len(want)], want) {
			return true
		}
	}
	return false
}

func TestUnwindChain(t *testing.T) {
	testprog.RequireRoot(t)
	for _, tc := range []struct{ exe, lib string }{
		{omitFP, omitFP},
		{keepFP, keepFP},
		{keepFP, omitFP},
		{omitFP, keepFP},
		{omitFP, dwarfFP},  // library CFI only in .debug_frame
		{dwarfFP, dwarfFP}, // executable too (its crt code keeps .eh_frame)
		{omitFP, nocfiFP},  // library frames by the frame-pointer fallback
	} {
		t.Run("exe-"+tc.exe+"-fp/lib-"+tc.lib+"-fp", func(t *testing.T) {
			b := buildPair(t, tc.exe, tc.lib)
			checkFP := func(path, mode string) {
				f, err := elf.Open(path)
				if err != nil {
					t.Fatalf("open %s: %v", path, err)
				}
				defer f.Close()
				if got := HasFramePointers(f); got != (mode == keepFP) {
					t.Errorf("HasFramePointers(%s built %s-fp) = %v", filepath.Base(path), mode, got)
				}
			}
			for _, o := range []struct{ path, mode string }{{b.exe, tc.exe}, {b.lib, tc.lib}} {
				if o.mode == omitFP || o.mode == keepFP {
					checkFP(o.path, o.mode)
				}
			}

			tg := startTarget(t, b.exe, "chain")
			regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
			sym := newSymbolizer(t, tg.maps)
			c := NewCache(64 << 20)
			p, err := c.Process(tg.pid, tg.maps)
			if err != nil {
				t.Fatalf("Process(%d): %v", tg.pid, err)
			}
			defer p.Close()
			pcs, truncated := p.Unwind(regs, stack, 128)
			checkStack(t, sym, pcs, truncated, chainWant(), false)

			if tc.exe == omitFP && tc.lib == omitFP {
				fp, _ := FramePointers(regs, stack, 128)
				fpNames := sym.names(fp)
				t.Logf("frame-pointer walk alone: %d frames: %v", len(fp), fpNames)
				if containsRun(fpNames, chainWant()) {
					t.Errorf("frame-pointer walk recovered the chain on a -fomit-frame-pointer build; the test proves nothing")
				}
				if slices.Contains(fpNames, "main") {
					t.Errorf("frame-pointer walk reached main on a -fomit-frame-pointer build: %v", fpNames)
				}
			}

			// A short stack copy must stop, flagged, after a correct prefix.
			for _, n := range []int{0, 64, 256, 1024} {
				short, tr := p.Unwind(regs, stack[:n], 128)
				if !tr {
					t.Errorf("%d-byte stack copy: truncated = false, %d frames", n, len(short))
				}
				if len(short) == 0 || !slices.Equal(short, pcs[:len(short)]) {
					t.Errorf("%d-byte stack copy gave %x, not a prefix of %x", n, short, pcs)
				}
			}
			buf := []uint64{42}
			if app, tr := p.AppendUnwind(buf, regs, stack, 128); tr || !slices.Equal(app[1:], pcs) || app[0] != 42 {
				t.Errorf("AppendUnwind = %x, %v; want 42 then %x", app, tr, pcs)
			}
			// max frames reached is a truncation too.
			if few, tr := p.Unwind(regs, stack, 5); len(few) != 5 || !tr || !slices.Equal(few, pcs[:5]) {
				t.Errorf("Unwind(max=5) = %x, %v; want the first 5 frames, truncated", few, tr)
			}
		})
	}
}

// TestUnwindNoCFINoFP: a library with neither CFI nor frame pointers. The
// walk must stop at its first frame, flagged truncated, after correct frames.
func TestUnwindNoCFINoFP(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, nocfi)
	sym, pcs, truncated := unwindStopped(t, b.exe, "chain")
	names := sym.names(pcs)
	t.Logf("%d frames, truncated=%v: %v", len(pcs), truncated, names)
	if !truncated {
		t.Errorf("truncated = false through a library without CFI or frame pointers")
	}
	if n := len(names); n < 3 || names[n-1] != "unw_lib_mid" || names[n-2] != "leaf" {
		t.Errorf("walk = %v, want read frames, leaf, unw_lib_mid and a stop", names)
	}
}

// TestUnwindGarbage feeds corrupted copies of a real stack and nonsense
// registers: the unwinder must neither panic nor loop, and every frame it
// returns before a corrupted word must match the true stack.
func TestUnwindGarbage(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, omitFP)
	tg := startTarget(t, b.exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
	c := NewCache(64 << 20)
	p, err := c.Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", tg.pid, err)
	}
	defer p.Close()
	truth, _ := p.Unwind(regs, stack, 128)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		bad := slices.Clone(stack)
		for range 1 + rng.IntN(8) {
			off := rng.IntN(len(bad)/8) * 8
			binary.LittleEndian.PutUint64(bad[off:], rng.Uint64()>>rng.IntN(64))
		}
		r := regs
		switch i % 4 {
		case 1:
			r.BP = rng.Uint64()
		case 2:
			r.BP = regs.SP + uint64(rng.IntN(len(stack)))
		case 3:
			r.IP = truth[rng.IntN(len(truth))]
		}
		pcs, _ := p.Unwind(r, bad, 64)
		if len(pcs) == 0 || len(pcs) > 64 {
			t.Fatalf("corrupted stack %d: %d frames", i, len(pcs))
		}
	}
	for i := range 1000 {
		r := Regs{IP: rng.Uint64(), SP: rng.Uint64(), BP: rng.Uint64()}
		if i%2 == 0 {
			r.IP = truth[rng.IntN(len(truth))]
		}
		junk := make([]byte, 1024)
		for j := range junk {
			junk[j] = byte(rng.Uint32())
		}
		if pcs, tr := p.Unwind(r, junk, 64); len(pcs) > 64 || (len(pcs) > 1 && !tr && i%2 == 1) {
			t.Logf("random regs %d gave %d frames truncated=%v", i, len(pcs), tr)
		}
	}
}

func TestUnwindThread(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, omitFP)
	tg := startTarget(t, b.exe, "thread")
	if tg.tid == tg.pid {
		t.Fatalf("leaf ran on the main thread %d, want a second thread", tg.tid)
	}
	regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
	c := NewCache(64 << 20)
	p, err := c.Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", tg.pid, err)
	}
	defer p.Close()
	pcs, truncated := p.Unwind(regs, stack, 128)
	checkStack(t, newSymbolizer(t, tg.maps), pcs, truncated, threadWant(), true)
}

// TestUnwindQsort unwinds through libc's own frames in the middle of the
// stack: leaf is reached from a comparison callback called by qsort.
func TestUnwindQsort(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, omitFP)
	sym, pcs, truncated := unwindStopped(t, b.exe, "qsort")
	names := sym.names(pcs)
	t.Logf("%d frames, truncated=%v: %v", len(pcs), truncated, names)
	if truncated {
		t.Errorf("truncated = true, want a complete stack through qsort")
	}
	i := slices.Index(names, "leaf")
	j := slices.Index(names, "sort_level1")
	if i < 1 || j < i+3 || names[i+1] != "cmp_block" {
		t.Fatalf("want read frames, leaf, cmp_block, qsort's libc frames, sort_level1; got %v", names)
	}
	for k := i + 2; k < j; k++ {
		if !sym.inLibc(pcs[k]) {
			t.Errorf("frame %d (%#x %s) between cmp_block and sort_level1 is not in libc", k, pcs[k], names[k])
		}
	}
	if !slices.Contains(names[i+2:j], "qsort") && !slices.Contains(names[i+2:j], "qsort_r") {
		t.Errorf("no qsort or qsort_r frame between cmp_block and sort_level1: %v", names[i+2:j])
	}
	if j+1 >= len(names) || names[j+1] != "main" || names[len(names)-1] != "_start" {
		t.Errorf("frames from sort_level1 = %v, want sort_level1 main ... _start", names[j:])
	}
}

// TestUnwindCxxThread unwinds a std::thread: program frames, libstdc++'s
// thread trampoline (Debian's libstdc++ has no frame pointers), then glibc's
// thread start.
func TestUnwindCxxThread(t *testing.T) {
	testprog.RequireRoot(t)
	exe := testprog.Build(t, "unw_cxx.cc", fpFlags(omitFP)...)
	tg := startTarget(t, exe, "")
	regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
	sym := newSymbolizer(t, tg.maps)
	c := NewCache(64 << 20)
	p, err := c.Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", tg.pid, err)
	}
	defer p.Close()
	pcs, truncated := p.Unwind(regs, stack, 128)
	names := sym.names(pcs)
	t.Logf("%d frames, truncated=%v: %v", len(pcs), truncated, names)
	if truncated {
		t.Errorf("truncated = true, want a complete stack up to the thread start")
	}
	i := slices.Index(names, "cxx_leaf")
	if i < 1 || len(names) < i+3 || !slices.Equal(names[i:i+3], []string{"cxx_leaf", "cxx_level2", "cxx_level1"}) {
		t.Fatalf("want read frames, cxx_leaf, cxx_level2, cxx_level1; got %v", names)
	}
	// Then template frames of the program (lambda, _M_run), one libstdc++
	// frame, and glibc's start_thread/clone3.
	k := i + 3
	for k < len(pcs) && sym.objectOf(pcs[k]) == exe {
		k++
	}
	if k == i+3 || k >= len(pcs) || !strings.HasPrefix(filepath.Base(sym.objectOf(pcs[k])), "libstdc++") {
		t.Fatalf("after cxx_level1 want program frames then libstdc++; got %v", names[i+3:])
	}
	rest := pcs[k+1:]
	if len(rest) < 1 || len(rest) > 3 {
		t.Fatalf("%d frames after libstdc++, want 1-3 (start_thread, clone3): %v", len(rest), names[k+1:])
	}
	for _, pc := range rest {
		if !sym.inLibc(pc) {
			t.Errorf("frame %#x after libstdc++ is not in libc", pc)
		}
	}
}

// TestUnwindSignal unwinds through a signal frame: leaf runs in a SIGUSR1
// handler raised by sig_level2. The glibc trampoline __restore_rt restores
// rsp, rbp and rip from the saved context with DWARF expressions.
func TestUnwindSignal(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, omitFP)
	sym, pcs, truncated := unwindStopped(t, b.exe, "signal")
	names := sym.names(pcs)
	t.Logf("%d frames, truncated=%v: %v", len(pcs), truncated, names)
	if truncated {
		t.Errorf("truncated = true, want a complete stack through the signal frame")
	}
	i := slices.Index(names, "leaf")
	if i < 1 || i+1 >= len(names) || names[i+1] != "on_signal" {
		t.Fatalf("want read frames, leaf, on_signal; got %v", names)
	}
	j := slices.Index(names, "sig_level2")
	if j < i+3 {
		t.Fatalf("want __restore_rt and raise's libc frames between on_signal and sig_level2; got %v", names)
	}
	for k := i + 2; k < j; k++ {
		if !sym.inLibc(pcs[k] + 1) {
			t.Errorf("frame %d (%#x %s) between on_signal and sig_level2 is not in libc", k, pcs[k], names[k])
		}
	}
	want := []string{"sig_level2", "sig_level1", "main"}
	if !slices.Equal(names[j:j+3], want) || names[len(names)-1] != "_start" {
		t.Errorf("frames from sig_level2 = %v, want %v ... _start", names[j:], want)
	}
}

// TestProcessLifetime checks that a Process unwinds after its process exited
// and its files were deleted, with caches too small to keep all tables (so
// tables are re-parsed from the files the Process holds open), and that
// Update adds a mapping the Process did not have.
func TestProcessLifetime(t *testing.T) {
	testprog.RequireRoot(t)
	// Private copies, since the files are deleted below.
	lib := testprog.Build(t, "unw_lib.c", append(fpFlags(omitFP), "-shared", "-fPIC", "-Wl,-soname,unw_lib")...)
	exe := testprog.Build(t, "unw_chain.c", append(fpFlags(omitFP), "-Wl,--no-as-needed", lib, "-Wl,-rpath,"+filepath.Dir(lib))...)

	tg := startTarget(t, exe, "chain")
	regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
	sym := newSymbolizer(t, tg.maps)

	var noLib []procmaps.Mapping
	for _, m := range tg.maps {
		if m.Path != lib {
			noLib = append(noLib, m)
		}
	}
	// Budgets: unbounded; 1 byte (no table retained); the largest table
	// (libc's) plus one byte, so any two tables overflow it and walking
	// exe, lib and libc frames evicts and re-parses tables all the time.
	budgets := []int64{0, 1, -1}
	var procs []*Process
	var caches []*Cache
	for i, budget := range budgets {
		if budget < 0 {
			caches[0].mu.Lock()
			for _, e := range caches[0].tables {
				budget = max(budget, e.tab.bytes+1)
			}
			caches[0].mu.Unlock()
			budgets[i] = budget
		}
		c := NewCache(budget)
		p, err := c.Process(tg.pid, noLib)
		if err != nil {
			t.Fatalf("Process(%d): %v", tg.pid, err)
		}
		defer p.Close()
		// Without the library's mapping the walk must stop at the library frame:
		// leaf's return address into unw_lib_mid is known from leaf's CFI, but it
		// lies outside every mapping the Process knows.
		pcs, truncated := p.Unwind(regs, stack, 128)
		names := sym.names(pcs)
		if !truncated || len(names) < 2 || names[len(names)-1] != "unw_lib_mid" || names[len(names)-2] != "leaf" {
			t.Errorf("budget %d, without the library mapping: %v truncated=%v, want a walk ending leaf, unw_lib_mid, truncated", budget, names, truncated)
		}
		if err := p.Update(tg.maps); err != nil {
			t.Fatalf("Update: %v", err)
		}
		procs = append(procs, p)
		caches = append(caches, c)
	}

	// Kill the process and delete its files: the open files still serve.
	proc, _ := os.FindProcess(tg.pid)
	proc.Kill()
	for procmaps.Alive(tg.pid) {
		time.Sleep(10 * time.Millisecond)
	}
	os.Remove(exe)
	os.Remove(lib)
	for i, p := range procs {
		loads := caches[i].Loads()
		pcs, truncated := p.Unwind(regs, stack, 128)
		checkStack(t, sym, pcs, truncated, chainWant(), false)
		n, bytes := caches[i].Stats()
		reparsed := caches[i].Loads() - loads
		t.Logf("budget %d: %d tables, %d bytes held, %d tables parsed by this unwind", budgets[i], n, bytes, reparsed)
		if i == 2 && reparsed == 0 {
			t.Errorf("budget %d: no table was evicted and re-parsed; the test does not exercise eviction", budgets[i])
		}
		if budgets[i] > 0 && bytes > budgets[i] {
			t.Errorf("cache with budget %d holds %d bytes", budgets[i], bytes)
		}
	}
	if n, _ := caches[1].Stats(); n != 0 {
		t.Errorf("cache with a 1-byte budget holds %d tables", n)
	}
	if caches[0].Loads() != 4 {
		t.Errorf("unbounded cache parsed %d tables, want 4 (exe, lib, libc, ld.so)", caches[0].Loads())
	}
}

func TestCacheShared(t *testing.T) {
	testprog.RequireRoot(t)
	b := buildPair(t, omitFP, omitFP)
	t1 := startTarget(t, b.exe, "chain")
	t2 := startTarget(t, b.exe, "chain")
	c := NewCache(64 << 20)
	p1, err := c.Process(t1.pid, t1.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", t1.pid, err)
	}
	defer p1.Close()
	tables, bytes := c.Stats()
	loads := c.Loads()
	p2, err := c.Process(t2.pid, t2.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", t2.pid, err)
	}
	defer p2.Close()
	t.Logf("cache after one process: %d tables, %d bytes", tables, bytes)
	if tables < 3 { // unw_chain, unw_lib, libc, ld.so
		t.Errorf("cache holds %d tables, want at least 3", tables)
	}
	if c.Loads() != loads {
		t.Errorf("second process of the same binary parsed %d more tables, want 0 (shared by build ID)", c.Loads()-loads)
	}
	// LRU bound: room for about one big table.
	small := NewCache(bytes / 2)
	p3, _ := small.Process(t1.pid, t1.maps)
	defer p3.Close()
	if _, got := small.Stats(); got > bytes/2 {
		t.Errorf("cache bounded to %d bytes holds %d", bytes/2, got)
	}
}

func TestHasFramePointersSystem(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("find test executable: %v", err)
	}
	for _, c := range []struct {
		path string
		want bool
	}{
		{self, true}, // Go keeps frame pointers on amd64
		{"/lib/x86_64-linux-gnu/libc.so.6", false}, // Debian builds without them
	} {
		f, err := elf.Open(c.path)
		if err != nil {
			t.Fatalf("open %s: %v", c.path, err)
		}
		if got := HasFramePointers(f); got != c.want {
			t.Errorf("HasFramePointers(%s) = %v, want %v", c.path, got, c.want)
		}
		f.Close()
	}
}

// TestPLT evaluates the CFA expression GCC/ld emit for .plt entries, on the
// real executable: CFA = rsp+8, or rsp+16 once the entry has pushed its
// relocation index (offset >= 11 in the 16-byte entry).
func TestPLT(t *testing.T) {
	b := buildPair(t, omitFP, omitFP)
	f, err := elf.Open(b.exe)
	if err != nil {
		t.Fatalf("open %s: %v", b.exe, err)
	}
	defer f.Close()
	plt := f.Section(".plt")
	if plt == nil || plt.Size < 32 {
		t.Fatalf("%s has no .plt with entries", b.exe)
	}
	tab, err := parseTable(f)
	if err != nil {
		t.Fatalf("parse CFI of %s: %v", b.exe, err)
	}
	const sp = 0x7ffd0000
	for _, off := range []uint64{0, 6, 10, 11, 15} {
		pc := plt.Addr + 16 + off // first entry after PLT0
		rw := tab.lookup(pc)
		if rw == nil || rw.cfaReg != cfaExpr {
			t.Fatalf("pc %#x in .plt: row %+v, want a CFA expression", pc, rw)
		}
		cfa, ok := eval(tab.exprs[rw.cfaOff], &exprCtx{sp: sp, pc: pc}, 0, false)
		want := uint64(sp + 8)
		if off >= 11 {
			want = sp + 16
		}
		if !ok || cfa != want {
			t.Errorf("pc .plt+16+%d: CFA = %#x (ok=%v), want %#x", off, cfa, ok, want)
		}
	}
}

func BenchmarkUnwind(b *testing.B) {
	testprog.RequireRoot(b)
	bp := buildPair(b, omitFP, omitFP)
	tg := startTarget(b, bp.exe, "chain")
	regs, stack := capture(b, tg.pid, tg.tid, 16<<10)
	c := NewCache(64 << 20)
	p, err := c.Process(tg.pid, tg.maps)
	if err != nil {
		b.Fatalf("Process(%d): %v", tg.pid, err)
	}
	defer p.Close()
	pcs, tr := p.Unwind(regs, stack, 128)
	if tr {
		b.Fatalf("stack truncated: %x", pcs)
	}
	b.Run("Unwind", func(b *testing.B) {
		b.ReportMetric(float64(len(pcs)), "frames")
		for b.Loop() {
			p.Unwind(regs, stack, 128)
		}
	})
	b.Run("AppendUnwind", func(b *testing.B) {
		buf := make([]uint64, 0, 128)
		b.ReportMetric(float64(len(pcs)), "frames")
		for b.Loop() {
			got, _ := p.AppendUnwind(buf[:0], regs, stack, 128)
			if len(got) != len(pcs) {
				b.Fatalf("AppendUnwind gave %d frames, Unwind %d", len(got), len(pcs))
			}
		}
	})
}

// BenchmarkParseLibc measures building the unwind table of the system libc
// (the cost of a cache miss for the largest common object).
func BenchmarkParseLibc(b *testing.B) {
	f, err := elf.Open("/lib/x86_64-linux-gnu/libc.so.6")
	if err != nil {
		b.Fatalf("open libc: %v", err)
	}
	defer f.Close()
	var tab *table
	for b.Loop() {
		if tab, err = parseTable(f); err != nil {
			b.Fatalf("parse libc CFI: %v", err)
		}
	}
	b.ReportMetric(float64(tab.fdes), "FDEs")
	b.ReportMetric(float64(len(tab.rows)), "rows")
	b.ReportMetric(float64(tab.bytes), "table-bytes")
}

// unwindStopped runs exe in mode until it stops at its deepest point,
// captures its registers and 16 KiB of stack as the BPF side would, and
// unwinds them.
func unwindStopped(t *testing.T, exe, mode string) (*symbolizer, []uint64, bool) {
	t.Helper()
	tg := startTarget(t, exe, mode)
	regs, stack := capture(t, tg.pid, tg.tid, 16<<10)
	sym := newSymbolizer(t, tg.maps)
	p, err := NewCache(64<<20).Process(tg.pid, tg.maps)
	if err != nil {
		t.Fatalf("Process(%d): %v", tg.pid, err)
	}
	defer p.Close()
	pcs, truncated := p.Unwind(regs, stack, 128)
	return sym, pcs, truncated
}
