package recorder

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
)

// TestAddPidConcurrent: a process found by several scans at once (the
// agent's AddCgroup racing the poll loop) is attached once. Its uprobe
// links are counted against a process added once: twice as many links
// meant every allocation counted twice (a live heap reported at 2x).
func TestAddPidConcurrent(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "rec_leaky.c")
	s, err := Start(context.Background(), Options{SampleRate: 1, AllowEmpty: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	links := func() int {
		ents, _ := os.ReadDir("/proc/self/fd")
		n := 0
		for _, e := range ents {
			if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == "anon_inode:bpf_link" {
				n++
			}
		}
		return n
	}
	once := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
	once.Expect(t, "READY")
	n0 := links()
	if err := s.AddPid(once.Pid()); err != nil {
		t.Fatal(err)
	}
	single := links() - n0
	// the race is timing-dependent: a few rounds, 8 goroutines released
	// together each
	for round := 0; round < 4; round++ {
		racy := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
		racy.Expect(t, "READY")
		n1 := links()
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				if err := s.AddPid(racy.Pid()); err != nil {
					t.Error(err)
				}
			}()
		}
		close(gate)
		wg.Wait()
		concurrent := links() - n1
		t.Logf("round %d: BPF links: %d for a process added once, %d for one added by 8 goroutines at once", round, single, concurrent)
		if single == 0 || concurrent != single {
			t.Errorf("links %d (added once) vs %d (added concurrently): want equal and nonzero", single, concurrent)
		}
	}
}

// TestScanCgroupConcurrent: two scans of one cgroup at once (AddCgroup and
// the poll loop) attach its process once and say "attached" once.
func TestScanCgroupConcurrent(t *testing.T) {
	testprog.RequireRoot(t)
	v1, v2 := cgroups.Root()
	root := v1
	if root == "" {
		root = v2
	}
	dir := filepath.Join(root, fmt.Sprintf("memprof-test-scan-%d", os.Getpid()))
	if err := cgroups.Create(dir, 0); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })
	bin := testprog.Build(t, "rec_leaky.c")
	prog := testprog.Start(t, bin, nil, "--wait-start", "--wait-end")
	prog.Expect(t, "READY")
	if err := cgroups.AddProcess(dir, prog.Pid()); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	attached := 0
	s, err := Start(context.Background(), Options{SampleRate: 1, AllowEmpty: true, Poll: time.Hour, Notify: func(msg string) {
		if strings.HasPrefix(msg, "attached to process") {
			mu.Lock()
			attached++
			mu.Unlock()
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var wg sync.WaitGroup
	gate := make(chan struct{})
	total := 0
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			n, err := s.scanCgroup(dir)
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			total += n
			mu.Unlock()
		}()
	}
	close(gate)
	wg.Wait()
	t.Logf("8 concurrent scans: %d attached, %d notices", total, attached)
	if total != 1 || attached != 1 || len(s.Targets()) != 1 {
		t.Errorf("8 concurrent scans of a cgroup with one process: %d attached, %d notices, %d targets; want 1, 1, 1", total, attached, len(s.Targets()))
	}
}
