package recorder

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/targetfs"
)

// command runs a program under memprof: it is started stopped at its exec
// (ptrace), the probes are attached to the allocators it will load, and it
// is let go; at its exit it stops once more (PTRACE_O_TRACEEXIT) so its
// memory map and heap can be read before the kernel tears them down.
// Signals it receives are passed through unchanged. When it execs another
// program (env, a shell wrapper), the new program's allocators are attached
// at that exec the same way.
type command struct {
	argv   []string
	env    []string
	pid    int
	status chan cmdExit
}

type cmdExit struct {
	code   int // exit code, or 128+signal
	signal syscall.Signal
	err    error
}

// startCommand starts argv. attach is called with the child stopped right
// after exec, the libraries it will map listed by path; atExit is called
// with the child stopped in its exit, its address space still intact.
// Both run on the tracer thread.
func startCommand(argv []string, env []string, attach func(pid int, libs []string, exec bool) error, atExit func(pid int)) (*command, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("no command given after --")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, fmt.Errorf("command %q: %w", argv[0], err)
	}
	path, _ = filepath.Abs(path)
	c := &command{argv: argv, env: env, status: make(chan cmdExit, 1)}
	started := make(chan error, 1)
	go c.trace(path, attach, atExit, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return c, nil
}

func (c *command) trace(path string, attach func(int, []string, bool) error, atExit func(int), started chan<- error) {
	// ptrace requests must come from the thread that became the tracer.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	proc, err := os.StartProcess(path, c.argv, &os.ProcAttr{
		Env:   c.env,
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   &syscall.SysProcAttr{Ptrace: true},
	})
	if err != nil {
		started <- fmt.Errorf("start %s: %w", path, err)
		return
	}
	pid := proc.Pid
	c.pid = pid
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil || !ws.Stopped() {
		started <- fmt.Errorf("start %s: child did not stop at exec (%v, status %v)", path, err, ws)
		return
	}
	_ = syscall.PtraceSetOptions(pid, unix.PTRACE_O_TRACEEXIT|unix.PTRACE_O_TRACEEXEC|unix.PTRACE_O_EXITKILL)
	libs := []string{path}
	libs = append(libs, loadedLibraries(path, c.env)...)
	if err := attach(pid, libs, false); err != nil {
		syscall.Kill(pid, syscall.SIGKILL)
		syscall.PtraceCont(pid, 0)
		syscall.Wait4(pid, &ws, 0, nil)
		started <- err
		return
	}
	if err := syscall.PtraceCont(pid, 0); err != nil {
		started <- fmt.Errorf("resume %s: %w", path, err)
		return
	}
	started <- nil

	for {
		_, err := syscall.Wait4(pid, &ws, syscall.WALL, nil)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			c.status <- cmdExit{code: -1, err: err}
			return
		}
		switch {
		case ws.Exited():
			c.status <- cmdExit{code: ws.ExitStatus()}
			return
		case ws.Signaled():
			c.status <- cmdExit{code: 128 + int(ws.Signal()), signal: ws.Signal()}
			return
		case ws.Stopped():
			sig := ws.StopSignal()
			if sig == syscall.SIGTRAP && ws.TrapCause() == syscall.PTRACE_EVENT_EXIT {
				atExit(pid)
				syscall.PtraceCont(pid, 0)
				continue
			}
			if sig == syscall.SIGTRAP && ws.TrapCause() == syscall.PTRACE_EVENT_EXEC {
				// A new program in the same process: attach to the
				// allocators it will load before it runs.
				exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
				if err == nil {
					libs := append([]string{exe}, loadedLibraries(exe, processEnv(pid))...)
					attach(pid, libs, true)
				}
				syscall.PtraceCont(pid, 0)
				continue
			}
			if sig == syscall.SIGTRAP {
				sig = 0
			}
			syscall.PtraceCont(pid, int(sig))
		}
	}
}

// processEnv reads a process's environment (NUL-separated).
func processEnv(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil
	}
	var env []string
	for _, kv := range bytes.Split(b, []byte{0}) {
		if len(kv) > 0 {
			env = append(env, string(kv))
		}
	}
	return env
}

// loadedLibraries lists the shared objects the dynamic loader will map for
// the executable under env (LD_PRELOAD and LD_LIBRARY_PATH included), by
// asking the executable's own loader (`ld.so --list`, which loads nothing
// and runs none of the program's code). A static executable has none.
func loadedLibraries(exe string, env []string) []string {
	fd, err := targetfs.Open(exe) // non-blocking, regular files only
	if err != nil {
		return nil
	}
	defer fd.Close()
	f, err := targetfs.NewELF(fd) // PT_INTERP checked to lie inside the file
	if err != nil {
		return nil
	}
	interp := ""
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err == nil {
				interp = string(bytes.TrimRight(b, "\x00"))
			}
		}
	}
	if interp == "" {
		return nil
	}
	cmd := exec.Command(interp, "--list", exe)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		return nil
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		for _, field := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(field, "/") {
				libs = append(libs, field)
			}
		}
	}
	return libs
}
