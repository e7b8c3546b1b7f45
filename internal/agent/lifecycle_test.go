package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// TestAgentExitedProcessesInProfile: processes of a profiled container
// that allocate a known amount and exit between two periodic profiles are
// in the container's next saved profile with their heap at exit, exactly,
// every one of them (issue 14, the agent's side).
func TestAgentExitedProcessesInProfile(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "exit_soon.cc")
	fsRoot := "memprof-agexit-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpx-" + randHex(6)
	a, _, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		ProfileInterval:  time.Second,
		SampleRate:       1,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
		Logf: func(f string, args ...any) {
			if msg := fmt.Sprintf(f, args...); !strings.Contains(msg, "attached to process") && !strings.Contains(msg, ") exited") {
				t.Log(msg)
			}
		},
	})
	dir := fakePod(t, fsRoot, logs, ns, "exits", "app")
	waitFor(t, 15*time.Second, "the agent to profile the pod", func() bool { return findContainer(a, ns, "exits") != nil })

	const runs, parallel = 50, 5
	var pids []int
	var mu sync.Mutex
	for b := 0; b < runs/parallel; b++ {
		var wg sync.WaitGroup
		for i := 0; i < parallel; i++ {
			env := []string(nil)
			if i%2 == 1 {
				env = []string{"LD_PRELOAD=" + testprog.Jemalloc}
			}
			prog := testprog.Start(t, bin, env, "--hold", "10")
			prog.Expect(t, "READY")
			if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(prog.Pid())), 0o644); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			pids = append(pids, prog.Pid())
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				deadline := time.Now().Add(20 * time.Second)
				for {
					if _, ok := a.s.Targets()[prog.Pid()]; ok {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("the agent did not attach to process %d", prog.Pid())
						return
					}
					time.Sleep(10 * time.Millisecond)
				}
				prog.Send(t, "go")
				prog.Cmd.Wait()
			}()
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
	}
	// Every exited process is in a saved profile: the last one holding its
	// pid has its heap at exit.
	type siteKey struct {
		pid int
		fn  string
	}
	var got map[siteKey]int64
	waitFor(t, 20*time.Second, "saved profiles holding every exited process", func() bool {
		files, err := a.StoredProfiles()
		if err != nil {
			return false
		}
		sort.Strings(files) // named by time
		got = map[siteKey]int64{}
		last := map[int]string{}
		for _, f := range files {
			p, err := pprofout.ReadFile(f)
			if err != nil {
				continue // being written
			}
			inuse := -1
			for i, st := range p.SampleType {
				if st.Type == "inuse_space" {
					inuse = i
				}
			}
			this := map[siteKey]int64{}
			for _, smp := range p.Sample {
				pid, _ := strconv.Atoi(smp.Label["pid"][0])
				fn := "?"
				if len(smp.Location) > 0 && len(smp.Location[0].Line) > 0 {
					fn = smp.Location[0].Line[0].Function.Name
				}
				this[siteKey{pid, fn}] += smp.Value[inuse]
			}
			for k := range this {
				if last[k.pid] != f {
					for _, s := range []string{"keep_malloc", "keep_new", "leaf_malloc"} {
						delete(got, siteKey{k.pid, s})
					}
					last[k.pid] = f
				}
			}
			for k, v := range this {
				got[k] = v
			}
		}
		for _, pid := range pids {
			if got[siteKey{pid, "keep_malloc"}] == 0 {
				return false
			}
		}
		return true
	})
	bad := 0
	for _, pid := range pids {
		for _, s := range []struct {
			fn   string
			want int64
		}{{"keep_malloc", 4_194_304}, {"keep_new", 4_194_304}, {"leaf_malloc", 100_000}} {
			if v := got[siteKey{pid, s.fn}]; v != s.want {
				bad++
				t.Errorf("process %d: %s inuse_space %d in the saved profile after its exit, want exactly %d", pid, s.fn, v, s.want)
			}
		}
	}
	t.Logf("%d processes exited between periodic profiles; %d with their exact heap at exit in the container's saved profile", len(pids), len(pids)-bad/3)
}
