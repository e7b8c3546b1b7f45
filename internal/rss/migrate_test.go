package rss

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// A process that becomes a target or stops being one mid-recording is
// counted from then on and only then, although each thread caches its
// target verdict in BPF (bpf/rss.h, struct rss_verdict): rss_goleak
// faults 8 MiB from main.main as a non-target, 16 MiB from main.leakMore
// as a target, and 8 MiB from main.leakAgain as a non-target again, at
// --sample-rate 1. The process moves between a target cgroup and another
// one (v1 memory cgroups, then v2 cgroups), or is added by pid.
func TestTargetChangesMidRecording(t *testing.T) {
	testprog.RequireRoot(t)
	bin := t.TempDir() + "/rss_goleak"
	if out, err := exec.Command("go", "build", "-o", bin, testprog.Testdata("rss_goleak")).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	v1, v2 := cgroups.Root()
	for _, c := range []struct {
		name string
		root string
	}{{"v1 memcg", v1}, {"v2 cgroup", v2}} {
		t.Run(c.name, func(t *testing.T) {
			if c.root == "" {
				t.Fatalf("no %s hierarchy mounted (this host has both)", c.name)
			}
			dirs := [2]string{}
			for i, n := range []string{"target", "other"} {
				dirs[i] = filepath.Join(c.root, fmt.Sprintf("memprof-rss-move-%s-%d", n, os.Getpid()))
				if err := os.Mkdir(dirs[i], 0o755); err != nil {
					t.Fatal(err)
				}
				d := dirs[i]
				t.Cleanup(func() { cgroups.Remove(d) })
			}
			target, other := dirs[0], dirs[1]
			k := startWaiting(t, bin, "8")
			move := func(dir string) {
				t.Helper()
				if err := cgroups.AddProcess(dir, k.cmd.Process.Pid); err != nil {
					t.Fatal(err)
				}
			}
			move(other)
			s, err := Start(context.Background(), Options{SampleRate: 1, Cgroups: []string{target}})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			checkMoves(t, s, k, func() {
				move(target)
				// The move is seen by the next scan, which builds the
				// process's unwind tables in the background; faults
				// before they are ready end [truncated] (counted) —
				// this test is about the verdicts, so it waits for them.
				pid := k.cmd.Process.Pid
				for deadline := time.Now().Add(5 * time.Second); !s.targets.Has(pid); time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("pid %d moved into %s: not picked up by the session's scan in 5 s", pid, target)
					}
				}
				if err := s.targets.Add(pid, nil, 3*time.Second); err != nil {
					t.Fatal(err)
				}
			}, func() { move(other) })
		})
	}
	t.Run("pid added", func(t *testing.T) {
		k := startWaiting(t, bin, "8")
		// Some other target, so that the filter runs (and caches a
		// verdict) for rss_goleak's threads before it is added.
		s, err := Start(context.Background(), Options{SampleRate: 1, Pids: []int{os.Getpid()}})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		checkMoves(t, s, k, func() {
			if err := s.AddPid(k.cmd.Process.Pid); err != nil {
				t.Fatal(err)
			}
		}, nil)
	})
}

// checkMoves runs rss_goleak's three phases around in (the process becomes
// a target) and out (it stops being one; nil: it stays a target) and
// checks faulted_space per phase against truth.
func checkMoves(t *testing.T, s *Session, k *known, in, out func()) {
	t.Helper()
	step := func(line string) {
		t.Helper()
		if line == "" {
			k.run(t)
			return
		}
		fmt.Fprintln(k.stdin, line)
		if l, err := k.out.ReadString('\n'); err != nil || strings.TrimSpace(l) != "ready" {
			t.Fatalf("rss_goleak: %q %v", l, err)
		}
	}
	step("") // leakSlices(8): not a target
	in()
	step("more 16")
	// Stacks are told apart by their caller of main.leakSlices (the leaf
	// side of every phase): main.main in the first phase.
	want := map[string]float64{"main.main": 0, "main.leakMore": 16 * mib, "main.leakAgain": 8 * mib}
	if out != nil {
		out()
		want["main.leakAgain"] = 0
	}
	step("again 8")
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	funcs := []string{"main.leakMore", "main.leakAgain", "main.main"}
	_, faulted, _ := byFunction(built, funcs)
	for _, f := range funcs {
		got := float64(faulted[f])
		t.Logf("%-16s faulted_space %6.2f MiB (truth %5.2f)", f, got/mib, want[f]/mib)
		// A phase as a non-target: nothing of its 8 MiB (the runtime's
		// own faults under main.main while a target: < 1 MiB).
		if want[f] == 0 && got > 1*mib || want[f] > 0 && math.Abs(got-want[f]) > 0.03*want[f] {
			t.Errorf("%s: faulted_space %.2f MiB, want %.2f (within 3%%)", f, got/mib, want[f]/mib)
		}
	}
}
