package rss

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/targetfs"
)

// command is a program started by the RSS session: stopped at its exec
// (ptrace) until it is a target (with its future children), and stopped
// once more in its exit so its residency can be read before the kernel
// unmaps its memory. Signals pass through unchanged.
type command struct {
	pid    int
	status chan cmdExit
}

type cmdExit struct {
	code   int
	signal syscall.Signal
	err    error
}

func startCommand(argv, env []string, started func(pid int, libs []string) error, exiting func(pid int)) (*command, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("no command given after --")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, fmt.Errorf("command %q: %w", argv[0], err)
	}
	path, _ = filepath.Abs(path)
	c := &command{status: make(chan cmdExit, 1)}
	ready := make(chan error, 1)
	go c.trace(path, argv, env, started, exiting, ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	return c, nil
}

func (c *command) trace(path string, argv, env []string, started func(int, []string) error, exiting func(int), ready chan<- error) {
	runtime.LockOSThread() // ptrace requests come from the tracer thread
	defer runtime.UnlockOSThread()
	proc, err := os.StartProcess(path, argv, &os.ProcAttr{
		Env: env, Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys: &syscall.SysProcAttr{Ptrace: true},
	})
	if err != nil {
		ready <- fmt.Errorf("start %s: %w", path, err)
		return
	}
	pid := proc.Pid
	c.pid = pid
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil {
		ready <- fmt.Errorf("start %s: wait for exec stop: %w", path, err)
		return
	}
	if !ws.Stopped() {
		ready <- fmt.Errorf("start %s: child did not stop at exec (status %v)", path, ws)
		return
	}
	// abort kills the child stopped at its exec and reaps it; errors on the
	// way are moot (it is being discarded), err says why.
	abort := func(err error) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		_ = syscall.PtraceCont(pid, 0)
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
		ready <- err
	}
	// Without TRACEEXIT the exit-time residency is never read, without
	// EXITKILL the child would outlive memprof stopped: refuse to run it so.
	if err := syscall.PtraceSetOptions(pid, unix.PTRACE_O_TRACEEXIT|unix.PTRACE_O_EXITKILL); err != nil {
		abort(fmt.Errorf("start %s: set ptrace options: %w", path, err))
		return
	}
	// The objects ld.so will map (their unwind tables are built before the
	// command runs).
	libs := append([]string{path}, targetfs.LoadedLibraries(path, env)...)
	if err := started(pid, libs); err != nil {
		abort(err)
		return
	}
	if err := syscall.PtraceCont(pid, 0); err != nil {
		ready <- fmt.Errorf("resume %s: %w", path, err)
		return
	}
	ready <- nil
	for {
		if _, err := syscall.Wait4(pid, &ws, syscall.WALL, nil); err != nil {
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
			if sig == syscall.SIGTRAP && ws.TrapCause() == unix.PTRACE_EVENT_EXIT {
				exiting(pid)
				// Fails only with ESRCH, when the child was killed
				// meanwhile: the next Wait4 reports that.
				_ = syscall.PtraceCont(pid, 0)
				continue
			}
			if sig == syscall.SIGTRAP {
				sig = 0
			}
			_ = syscall.PtraceCont(pid, int(sig)) // as above
		}
	}
}
