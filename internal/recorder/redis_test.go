package recorder

import (
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

// TestRedisStacks profiles Debian's redis-server (built without frame
// pointers, jemalloc linked dynamically) under redis-benchmark load in the
// default stack mode (CFI walk in BPF): the allocation stacks must reach
// the command handlers and main. (lpushCommand tail-calls
// pushGenericCommand, so the latter is the frame on the stack.) At
// --sample-rate 1 every allocation is sampled: no stack may be lost
// (stack copies, stack map, uw_stacks) and at least 99% of the sampled
// bytes must sit on stacks reaching main or start_thread (redis's and
// jemalloc's background threads), none truncated.
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
	for _, rate := range []uint64{64 * 1024, 1} {
		t.Run(fmt.Sprintf("rate-%d", rate), func(t *testing.T) {
			port := freePort(t)
			srv := exec.Command(server, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", t.TempDir())
			srv.Stdout, srv.Stderr = nil, nil
			if err := srv.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
			waitPort(t, port)

			p := record(t, Options{SampleRate: rate, Pids: []int{srv.Process.Pid}}, func(s *Session) {
				if hasFramePointers(srv.Process.Pid) {
					t.Fatalf("redis-server %s has frame pointers: the test needs a binary without them", server)
				}
				out, err := exec.Command(bench, "-p", strconv.Itoa(port), "-t", "set,lpush", "-n", "40000", "-d", "256", "-c", "10", "-q").CombinedOutput()
				if err != nil {
					t.Fatalf("redis-benchmark: %v\n%s", err, out)
				}
				t.Logf("redis-benchmark under memprof: %s", strings.TrimSpace(string(out)))
			})
			// Weigh stacks by allocated bytes (alloc_space).
			var total, toMain, toRoot, truncated int64
			chains := map[string]int64{}
			for _, smp := range p.Sample {
				f := frames(smp)
				v := smp.Value[1]
				total += v
				joined := " " + strings.Join(f, " ") + " "
				if strings.Contains(joined, " main ") {
					toMain += v
				}
				if strings.Contains(joined, " main ") || strings.Contains(joined, " start_thread ") {
					toRoot += v
				}
				if strings.Contains(joined, " [truncated] ") || strings.Contains(joined, " [stack unavailable] ") {
					truncated += v
				}
				for _, handler := range []string{"setCommand", "pushGenericCommand"} {
					if i := indexOf(f, handler); i >= 0 && hasInOrder(f[i:], "call", "processCommand", "aeMain", "main") {
						chains[handler] += v
					}
				}
			}
			pct := func(n int64) float64 { return 100 * float64(n) / float64(max(total, 1)) }
			t.Logf("alloc bytes %d, under main %d (%.2f%%), under main or start_thread %.2f%%, truncated or unavailable %.2f%%, complete handler chains %v",
				total, toMain, pct(toMain), pct(toRoot), pct(truncated), chains)
			for _, c := range p.Comments {
				if strings.Contains(c, "lost_") || strings.Contains(c, "unwind_") || strings.Contains(c, "bpf_") || strings.Contains(c, "stacks_") || strings.Contains(c, "samples") {
					t.Logf("%s", c)
				}
			}
			if total == 0 {
				t.Fatal("no allocations sampled in redis-server")
			}
			for _, h := range []string{"setCommand", "pushGenericCommand"} {
				if chains[h] == 0 {
					t.Errorf("no sampled allocation under %s <- call <- processCommand <- aeMain <- main", h)
				}
			}
			// Background threads (bio, jemalloc's) do not reach main; the
			// request path does: most allocated bytes sit under main.
			if pct(toMain) < 80 {
				t.Errorf("only %.0f%% of allocated bytes have stacks reaching main, want at least 80%%", pct(toMain))
			}
			if rate == 1 {
				if pct(toRoot) < 99 {
					t.Errorf("%.2f%% of sampled bytes have stacks reaching main or start_thread, want >= 99%%", pct(toRoot))
				}
				for _, key := range []string{"lost_stack_collision", "lost_stack_walk_failed", "lost_ringbuf_full", "bpf_stacks_lost"} {
					if v, ok := pprofoutComment(p, key); ok && v != "0" {
						t.Errorf("%s=%s, want 0", key, v)
					}
				}
			}
			if t.Failed() {
				for _, smp := range p.Sample {
					t.Logf("%v %s", smp.Value, strings.Join(frames(smp), " <- "))
				}
			}
		})
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
