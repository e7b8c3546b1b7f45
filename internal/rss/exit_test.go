package rss

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

// A recording of targets named by pid, without a duration, ends when they
// have all exited (as the heap tier's does), not at Ctrl-C only.
func TestWaitEndsWhenPidTargetsExit(t *testing.T) {
	testprog.RequireRoot(t)
	cmd := exec.Command("sleep", "0.5")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait() // reap it, so it is gone rather than a zombie
	s, err := Start(context.Background(), Options{SampleRate: 4096, Pids: []int{cmd.Process.Pid}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if r := s.Wait(ctx, 0); r != "all targets exited" {
		t.Fatalf("Wait = %q after %v, want \"all targets exited\"", r, time.Since(start))
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the exit of a 0.5 s process was noticed after %v, want within ~1 s", d)
	}
}
