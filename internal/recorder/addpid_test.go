package recorder

import (
	"context"
	"os"
	"sync"
	"testing"

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
