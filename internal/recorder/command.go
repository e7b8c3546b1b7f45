package recorder

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
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
//
// The whole process tree is followed (PTRACE_O_TRACEFORK, TRACEVFORK,
// TRACECLONE): a child process stops before it runs its first instruction,
// gets its own probes (uprobes attached for one pid are not inherited at
// fork) while its parent is still stopped in the fork, and is then let go.
// Threads are traced too (a fork from any thread must be seen); they stop
// only at their creation, their exit and on signals, never on system calls.
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

// commandHooks are called on the tracer thread with the process stopped.
type commandHooks struct {
	// attach: right after an exec (exec false: the command's own first
	// one), libs the objects the new program maps or will map.
	attach func(pid int, libs []string, exec bool) error
	// atExit: the process is in its exit, its address space intact.
	atExit func(pid int)
	// forked: a new process child of parent exists and has not run yet;
	// parent is stopped in its fork. vfork: the child shares the parent's
	// memory until it execs or exits.
	forked func(parent, child int, vfork bool)
}

// startCommand starts argv. attach is called with the child stopped right
// after exec, the libraries it will map listed by path; atExit is called
// with the child stopped in its exit, its address space still intact;
// forked (may be nil) when a process of the tree forks. All run on the
// tracer thread.
func startCommand(argv []string, env []string, attach func(pid int, libs []string, exec bool) error, atExit func(pid int), forked ...func(parent, child int, vfork bool)) (*command, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("no command given after --")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return nil, fmt.Errorf("command %q: %w", argv[0], err)
	}
	path, _ = filepath.Abs(path)
	c := &command{argv: argv, env: env, status: make(chan cmdExit, 1)}
	h := commandHooks{attach: attach, atExit: atExit, forked: func(int, int, bool) {}}
	if len(forked) > 0 && forked[0] != nil {
		h.forked = forked[0]
	}
	started := make(chan error, 1)
	go c.trace(path, h, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return c, nil
}

// waitAny is wait4(-1) limited to the tracer thread's own children and
// tracees (__WNOTHREAD), so processes other goroutines of memprof start are
// never reaped here.
const waitAny = syscall.WALL | unix.WNOTHREAD

func (c *command) trace(path string, h commandHooks, started chan<- error) {
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
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil {
		started <- fmt.Errorf("start %s: child did not stop at exec: %w", path, err)
		return
	} else if !ws.Stopped() {
		started <- fmt.Errorf("start %s: child did not stop at exec (status %v)", path, ws)
		return
	}
	_ = syscall.PtraceSetOptions(pid, unix.PTRACE_O_TRACEEXIT|unix.PTRACE_O_TRACEEXEC|unix.PTRACE_O_EXITKILL|
		unix.PTRACE_O_TRACEFORK|unix.PTRACE_O_TRACEVFORK|unix.PTRACE_O_TRACECLONE)
	// The program the kernel runs: for a #! script, its interpreter.
	exe := path
	if resolved, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil {
		exe = resolved
	}
	libs := []string{exe}
	libs = append(libs, targetfs.LoadedLibraries(exe, c.env)...)
	if err := h.attach(pid, libs, false); err != nil {
		// Abort: errors here mean the child is gone already.
		_ = syscall.Kill(pid, syscall.SIGKILL)
		_ = syscall.PtraceCont(pid, 0)
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
		started <- err
		return
	}
	if err := syscall.PtraceCont(pid, 0); err != nil {
		started <- fmt.Errorf("resume %s: %w", path, err)
		return
	}
	started <- nil
	c.follow(pid, h)
}

// follow services the stops of the traced tree until no tracee is left.
func (c *command) follow(root int, h commandHooks) {
	tgid := map[int]int{root: root} // traced task -> its process
	fresh := map[int]bool{}         // new tasks whose first stop (SIGSTOP) is still to come
	early := map[int]bool{}         // new tasks that stopped before their creator's event
	reported := false
	var ws syscall.WaitStatus
	for {
		wpid, err := syscall.Wait4(-1, &ws, waitAny, nil)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			if !reported {
				c.status <- cmdExit{code: -1, err: err}
			}
			return
		}
		switch {
		case ws.Exited() || ws.Signaled():
			delete(tgid, wpid)
			delete(fresh, wpid)
			delete(early, wpid)
			if wpid == root && !reported {
				reported = true
				if ws.Exited() {
					c.status <- cmdExit{code: ws.ExitStatus()}
				} else {
					c.status <- cmdExit{code: 128 + int(ws.Signal()), signal: ws.Signal()}
				}
			}
			continue
		case !ws.Stopped():
			continue
		}
		sig := ws.StopSignal()
		if _, known := tgid[wpid]; !known {
			// A new task's first stop can come before its creator's event.
			early[wpid] = true
			continue
		}
		if sig == syscall.SIGTRAP {
			switch ws.TrapCause() {
			case syscall.PTRACE_EVENT_EXIT:
				if tgid[wpid] == wpid {
					h.atExit(wpid)
				}
				_ = syscall.PtraceCont(wpid, 0) // fails only if it died: the next Wait4 says so
				continue
			case syscall.PTRACE_EVENT_EXEC:
				// A new program in the same process: attach to the
				// allocators it will load before it runs. (An exec from
				// a thread other than the leader is reported under the
				// process's pid.)
				tgid[wpid] = wpid
				exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", wpid))
				if err == nil {
					libs := append([]string{exe}, targetfs.LoadedLibraries(exe, processEnv(wpid))...)
					_ = h.attach(wpid, libs, true) // after an exec it records its own errors
				}
				_ = syscall.PtraceCont(wpid, 0) // fails only if it died: the next Wait4 says so
				continue
			case syscall.PTRACE_EVENT_FORK, syscall.PTRACE_EVENT_VFORK, syscall.PTRACE_EVENT_CLONE:
				msg, err := unix.PtraceGetEventMsg(wpid)
				if err == nil {
					child := int(msg)
					parent := tgid[wpid]
					if ws.TrapCause() == syscall.PTRACE_EVENT_CLONE && threadOf(child) == parent {
						tgid[child] = parent // a thread of the same process
					} else {
						tgid[child] = child
						h.forked(parent, child, ws.TrapCause() == syscall.PTRACE_EVENT_VFORK)
					}
					if early[child] {
						delete(early, child)
						_ = syscall.PtraceCont(child, 0) // fails only if it died: the next Wait4 says so
					} else {
						fresh[child] = true
					}
				}
				_ = syscall.PtraceCont(wpid, 0) // fails only if it died: the next Wait4 says so
				continue
			}
			sig = 0
		}
		if sig == syscall.SIGSTOP && fresh[wpid] {
			// The SIGSTOP every auto-attached task starts with.
			delete(fresh, wpid)
			_ = syscall.PtraceCont(wpid, 0) // fails only if it died: the next Wait4 says so
			continue
		}
		_ = syscall.PtraceCont(wpid, int(sig)) // fails only if it died: the next Wait4 says so
	}
}

// threadOf returns the process (thread group) task tid belongs to, 0 if
// unknown.
func threadOf(tid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// maxEnvBytes bounds the environment processEnv reads: execve bounds it
// by a quarter of the stack rlimit, which a process under an unlimited
// rlimit can make hundreds of MiB (what the loader needs of it, LD_PRELOAD
// and LD_LIBRARY_PATH, is far smaller).
const maxEnvBytes = 8 << 20

// processEnv reads a process's environment (NUL-separated), at most
// maxEnvBytes of it (a cut last variable is dropped).
func processEnv(pid int) []string {
	f, err := os.Open(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(f, maxEnvBytes+1))
	f.Close()
	if err != nil {
		return nil
	}
	if len(b) > maxEnvBytes {
		b = b[:bytes.LastIndexByte(b[:maxEnvBytes], 0)+1]
	}
	var env []string
	for _, kv := range bytes.Split(b, []byte{0}) {
		if len(kv) > 0 {
			env = append(env, string(kv))
		}
	}
	return env
}
