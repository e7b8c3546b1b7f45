package recorder

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

// TestRedisStacks profiles Debian's redis-server (built without frame
// pointers, jemalloc linked dynamically) under redis-benchmark load: the
// allocation stacks must reach the command handlers and main through CFI
// unwinding. (lpushCommand tail-calls pushGenericCommand, so the latter
// is the frame on the stack.)
func TestRedisStacks(t *testing.T) {
	testprog.RequireRoot(t)
	server, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server not installed (make deps installs redis-server and redis-tools): %v", err)
	}
	bench, err := exec.LookPath("redis-benchmark")
	if err != nil {
		t.Fatalf("redis-benchmark not installed (make deps installs redis-tools): %v", err)
	}
	if hasFramePointers(os.Getpid()) == false {
		t.Log("note: the test binary itself has no frame pointers")
	}
	port := freePort(t)
	srv := exec.Command(server, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", t.TempDir())
	srv.Stdout, srv.Stderr = nil, nil
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	waitPort(t, port)

	var reason string
	p := record(t, Options{SampleRate: 64 * 1024, Pids: []int{srv.Process.Pid}}, func(s *Session) {
		if hasFramePointers(srv.Process.Pid) {
			t.Fatalf("redis-server %s has frame pointers: the test needs a binary without them", server)
		}
		out, err := exec.Command(bench, "-p", strconv.Itoa(port), "-t", "set,lpush", "-n", "40000", "-d", "256", "-c", "10", "-q").CombinedOutput()
		if err != nil {
			t.Fatalf("redis-benchmark: %v\n%s", err, out)
		}
		t.Logf("redis-benchmark under memprof: %s", strings.TrimSpace(string(out)))
		reason = "benchmark done"
	})
	_ = reason
	// Weigh stacks by allocated bytes (alloc_space).
	var total, toMain int64
	chains := map[string]int64{}
	for _, smp := range p.Sample {
		f := frames(smp)
		v := smp.Value[1]
		total += v
		joined := " " + strings.Join(f, " ") + " "
		if strings.Contains(joined, " main ") {
			toMain += v
		}
		for _, handler := range []string{"setCommand", "pushGenericCommand"} {
			if i := indexOf(f, handler); i >= 0 && hasInOrder(f[i:], "call", "processCommand", "aeMain", "main") {
				chains[handler] += v
			}
		}
	}
	t.Logf("alloc bytes %d, under main %d (%.0f%%), complete handler chains %v", total, toMain, 100*float64(toMain)/float64(max(total, 1)), chains)
	if total == 0 {
		t.Fatal("no allocations sampled in redis-server")
	}
	for _, h := range []string{"setCommand", "pushGenericCommand"} {
		if chains[h] == 0 {
			t.Errorf("no sampled allocation under %s <- call <- processCommand <- aeMain <- main", h)
		}
	}
	// Background threads (bio, jemalloc's) do not reach main; the request
	// path does: most allocated bytes sit under main.
	if float64(toMain) < 0.8*float64(total) {
		t.Errorf("only %.0f%% of allocated bytes have stacks reaching main, want at least 80%%", 100*float64(toMain)/float64(total))
	}
	if t.Failed() {
		for _, smp := range p.Sample {
			t.Logf("%v %s", smp.Value, strings.Join(frames(smp), " <- "))
		}
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// hasInOrder reports whether s contains want as a subsequence.
func hasInOrder(s []string, want ...string) bool {
	i := 0
	for _, x := range s {
		if i < len(want) && x == want[i] {
			i++
		}
	}
	return i == len(want)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitPort(t *testing.T, port int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listens on port %d after 10s", port)
}
