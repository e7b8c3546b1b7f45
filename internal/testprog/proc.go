package testprog

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Proc is a test program running with its stdin and stdout connected to
// the test: the programs in testdata/ print what they did (and the truth
// the test checks) and wait for a line on stdin at the points where the
// test acts (attach a profiler, move the process into a cgroup).
type Proc struct {
	Cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
}

// Start runs bin with args and env added to the test's environment. Its
// stderr goes to the test's. It is killed and reaped at cleanup.
func Start(t testing.TB, bin string, env []string, args ...string) *Proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	p := &Proc{Cmd: cmd, stdin: in, lines: make(chan string, 1024)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	var once sync.Once
	t.Cleanup(func() {
		once.Do(func() {
			in.Close()
			cmd.Process.Kill()
			cmd.Wait()
		})
	})
	return p
}

// Pid is the program's process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Until reads output lines until one starts with prefix and returns it with
// the lines before it. The test fails if the program exits first or
// nothing comes within timeout.
func (p *Proc) Until(t testing.TB, prefix string, timeout time.Duration) (string, []string) {
	t.Helper()
	var seen []string
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("%s exited before printing %q; output: %q", p.Cmd.Path, prefix, seen)
			}
			if strings.HasPrefix(l, prefix) {
				return l, seen
			}
			seen = append(seen, l)
		case <-deadline:
			t.Fatalf("%s printed no %q within %v; output so far: %q", p.Cmd.Path, prefix, timeout, seen)
		}
	}
}

// Expect waits (up to a minute) for the line want.
func (p *Proc) Expect(t testing.TB, want string) []string {
	t.Helper()
	for {
		l, seen := p.Until(t, want, time.Minute)
		if l == want {
			return seen
		}
	}
}

// Send writes a line to the program's stdin.
func (p *Proc) Send(t testing.TB, line string) {
	t.Helper()
	if _, err := fmt.Fprintln(p.stdin, line); err != nil {
		t.Fatalf("write to %s: %v", p.Cmd.Path, err)
	}
}

// KeyValues parses the key=value lines among lines (numbers only).
func KeyValues(lines []string) map[string]uint64 {
	out := map[string]uint64{}
	for _, l := range lines {
		if k, v, ok := strings.Cut(l, "="); ok {
			if n, err := strconv.ParseUint(v, 10, 64); err == nil {
				out[k] = n
			}
		}
	}
	return out
}
