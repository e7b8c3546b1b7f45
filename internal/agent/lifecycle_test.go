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
	// pid has its heap at exit: 8,488,608 bytes, under keep_malloc,
	// keep_new and leaf_malloc (unless the stack map lost the stack to a
	// collision, which the profile reports: then the bytes are under
	// [stack unavailable]).
	type siteKey struct {
		pid int
		fn  string
	}
	const total = 2*4_194_304 + 100_000
	sites := []struct {
		fn   string
		want int64
	}{{"keep_malloc", 4_194_304}, {"keep_new", 4_194_304}, {"leaf_malloc", 100_000}}
	var got map[siteKey]int64
	var stackLoss map[int]bool
	var bad []string
	exact := func() bool {
		files, err := a.StoredProfiles()
		if err != nil {
			return false
		}
		sort.Strings(files) // named by time
		got, stackLoss = map[siteKey]int64{}, map[int]bool{}
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
			if inuse < 0 {
				continue // an RSS profile
			}
			lost := false
			for _, k := range []string{"lost_stack_collision", "lost_stack_walk_failed"} {
				if v, ok := pprofout.CommentValue(p, k); ok && v != "0" {
					lost = true
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
				this[siteKey{pid, ""}] += smp.Value[inuse]
			}
			for k := range this {
				if k.fn == "" { // the last file holding a pid wins
					for g := range got {
						if g.pid == k.pid {
							delete(got, g)
						}
					}
					stackLoss[k.pid] = lost
				}
			}
			for k, v := range this {
				got[k] = v
			}
		}
		// (A profile saved while a process still allocated holds part of
		// its heap: wait for the one after its exit.)
		bad = nil
		for _, pid := range pids {
			if v := got[siteKey{pid, ""}]; v != total {
				bad = append(bad, fmt.Sprintf("process %d: %d live bytes in the last saved profile holding it, want exactly %d", pid, v, total))
				continue
			}
			for _, s := range sites {
				if v := got[siteKey{pid, s.fn}]; v != s.want && !stackLoss[pid] {
					bad = append(bad, fmt.Sprintf("process %d: %s inuse_space %d, want exactly %d (no stack loss reported)", pid, s.fn, v, s.want))
				}
			}
		}
		return len(bad) == 0
	}
	for deadline := time.Now().Add(20 * time.Second); !exact() && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	for _, b := range bad {
		t.Error(b)
	}
	n := 0
	for _, pid := range pids {
		if stackLoss[pid] && got[siteKey{pid, "[stack unavailable]"}] > 0 {
			n++
		}
	}
	t.Logf("%d processes exited between periodic profiles, each with its exact heap at exit in the container's saved profile (%d with a stack lost to a stack-map collision, reported in the profile)", len(pids), n)

	// Children living 20 ms, less than the scan interval: the ones the
	// agent could not attach to in time are counted and exported, not
	// missed silently.
	wl := testprog.Build(t, "agent_workload.c")
	spawner := startIn(t, dir, wl, "spawn", "40", "20", "4096")
	fmt.Fprintln(spawner.stdin, "go")
	waitFor(t, 30*time.Second, "the spawner to finish", func() bool { return strings.Contains(spawner.out.String(), "done") })
	var missed float64
	waitFor(t, 10*time.Second, "the count of processes not profiled", func() bool {
		_, b := get(t, "http://"+a.Addr()+"/metrics", "")
		var ok bool
		missed, ok = metric(string(b), MetricNotProfiled, map[string]string{"cause": "skipped_exited_before_attach"})
		return ok && missed > 0
	})
	t.Logf("%s{cause=skipped_exited_before_attach} = %.0f of 40 children of 20 ms", MetricNotProfiled, missed)
	if missed > 40 {
		t.Errorf("%.0f processes counted as exited before attach, more than the 40 there were", missed)
	}
}
