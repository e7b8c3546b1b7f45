package unwindtable

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// pair is testdata/unw_chain.c linked against testdata/unw_lib.c.
type pair struct{ exe, lib string }

var (
	pairMu    sync.Mutex
	pairCache = map[string]pair{}
)

// buildPair compiles the test library and program with the given flags
// (shared by the tests of one run).
func buildPair(t testing.TB, name string, exeFlags, libFlags []string) pair {
	t.Helper()
	pairMu.Lock()
	defer pairMu.Unlock()
	if p, ok := pairCache[name]; ok {
		if _, err := os.Stat(p.exe); err == nil {
			return p
		}
	}
	lib := testprog.Build(t, "unw_lib.c", append(slicesClone(libFlags), "-shared", "-fPIC", "-Wl,-soname,unw_lib")...)
	exe := testprog.Build(t, "unw_chain.c", append(slicesClone(exeFlags), "-Wl,--no-as-needed", lib, "-Wl,-rpath,"+filepath.Dir(lib))...)
	p := pair{exe: exe, lib: lib}
	pairCache[name] = p
	return p
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// target is a running unw_chain blocked in leaf's read(0).
type target struct {
	pid, tid int
	maps     []procmaps.Mapping
	stdin    io.WriteCloser // a byte lets leaf's read return
}

// startTarget runs exe in mode until it prints "ready <tid>" from leaf.
func startTarget(t testing.TB, exe, mode string) *target {
	t.Helper()
	cmd := exec.Command(exe, mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatalf("stdin pipe: %v", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("stdout pipe: %v", err)
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
	return &target{pid: cmd.Process.Pid, tid: tid, maps: maps, stdin: stdin}
}

// capture stops thread tid with ptrace, reads its registers and copies up to
// n bytes of stack from rsp through /proc/PID/mem.
func capture(t testing.TB, pid, tid, n int) (unwind.Regs, []byte) {
	t.Helper()
	type result struct {
		regs  unwind.Regs
		stack []byte
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // ptrace requests must come from the tracer thread
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
		res.regs = unwind.Regs{IP: r.Rip, SP: r.Rsp, BP: r.Rbp}
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
		res.stack = buf[:got]
	}()
	res := <-ch
	if res.err != nil {
		t.Fatal(res.err)
	}
	return res.regs, res.stack
}
