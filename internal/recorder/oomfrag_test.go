package recorder

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/oom"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

func testCgroup(t *testing.T, name string, limit uint64) string {
	t.Helper()
	v1, v2 := cgroups.Root()
	root := v1
	if root == "" {
		root = v2
	}
	dir := filepath.Join(root, fmt.Sprintf("memprof-test-%s-%d", name, os.Getpid()))
	if err := cgroups.Create(dir, limit); err != nil {
		t.Fatalf("create cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })
	return dir
}

// TestOOMPostMortem: a target leaks in its own function until the kernel
// kills it at the cgroup's limit. The post-mortem names it, its top live
// site is the leak with bytes close to the limit, the report shows the limit
// and a cgroup-limit OOM; a second process in the cgroup survives and keeps
// being recorded.
func TestOOMPostMortem(t *testing.T) {
	for _, classic := range []bool{false, true} {
		name := "tp_btf"
		if classic {
			// The path of kernels before 6.8: the tracepoint gives the
			// pid and RSS figures, the cgroup comes from /proc.
			name = "classic-tracepoint"
		}
		t.Run(name, func(t *testing.T) { testOOMPostMortem(t, classic) })
	}
}

func testOOMPostMortem(t *testing.T, classic bool) {
	testprog.RequireRoot(t)
	const limit = 64 << 20
	dir := testCgroup(t, "oom", limit)
	leakBin := testprog.Build(t, "oom_leak.c")
	leakyBin := testprog.Build(t, "rec_leaky.c")

	victim := testprog.Start(t, leakBin, nil, "leak", "1048576")
	victim.Expect(t, "waiting")
	survivor := testprog.Start(t, leakyBin, nil, "--wait-start", "--wait-end")
	survivor.Expect(t, "READY")
	for _, pid := range []int{victim.Pid(), survivor.Pid()} {
		if err := cgroups.AddProcess(dir, pid); err != nil {
			t.Fatal(err)
		}
	}
	oomDir := t.TempDir()
	kills := make(chan []string, 4)
	p := record(t, Options{SampleRate: 1, Cgroups: []string{dir}, ClassicOOM: classic, OOM: func(k *OOMKill) {
		paths, err := WriteOOM(k, oomDir)
		if err != nil {
			t.Errorf("write post-mortem: %v", err)
		}
		kills <- paths
	}}, func(s *Session) {
		victim.Send(t, "go")
		var paths []string
		select {
		case paths = <-kills:
		case <-time.After(60 * time.Second):
			t.Fatal("no OOM kill reported within 60s")
		}
		err := victim.Cmd.Wait()
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Errorf("victim ended with %v, want killed by SIGKILL", err)
		}
		checkPostMortem(t, paths, victim.Pid(), dir, limit)
		// The survivor is still recorded after the kill.
		survivor.Send(t, "go")
		survivor.Expect(t, "DONE")
	})
	// Only the survivor's sites: exact at rate 1.
	checkExact(t, p, leakyTruth)
}

func checkPostMortem(t *testing.T, paths []string, pid int, dir string, limit uint64) {
	t.Helper()
	var profPath, jsonPath, textPath string
	for _, p := range paths {
		switch {
		case strings.HasSuffix(p, ".pb.gz"):
			profPath = p
		case strings.HasSuffix(p, ".json"):
			jsonPath = p
		case strings.HasSuffix(p, ".txt"):
			textPath = p
		}
	}
	wantBase := fmt.Sprintf("-oom_leak-%d", pid)
	if profPath == "" || jsonPath == "" || textPath == "" || !strings.Contains(filepath.Base(profPath), wantBase) {
		t.Fatalf("post-mortem files %v, want oom-<time>-oom_leak-%d.{pb.gz,json,txt}", paths, pid)
	}
	r, err := oom.ReadJSON(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	if r.Pid != pid || r.Comm != "oom_leak" {
		t.Errorf("report names pid %d (%s), want %d (oom_leak)", r.Pid, r.Comm, pid)
	}
	if r.Kind != oom.KindCgroupLimit {
		t.Errorf("report kind %q, want %q", r.Kind, oom.KindCgroupLimit)
	}
	if r.Limit != limit || r.CgroupPath != dir {
		t.Errorf("report limit %d of %s, want %d of %s", r.Limit, r.CgroupPath, limit, dir)
	}
	if r.AnonRSS < limit/2 {
		t.Errorf("victim anon RSS %d at the kill, want more than half the %d limit", r.AnonRSS, limit)
	}
	if len(r.TopStacks) == 0 || !strings.HasPrefix(r.TopStacks[0].Frames[0], "leak_block") {
		t.Errorf("report's top stack %v, want leak_block first", r.TopStacks)
	}
	prof, err := pprofout.ReadFile(profPath)
	if err != nil {
		t.Fatal(err)
	}
	inuse := bySite(t, prof, "inuse_space")
	// The leak reached the limit minus what else the cgroup holds (the
	// survivor's few MiB, the victim's own binary): at least 70% of it. It
	// can exceed the limit by the block being touched when the kill came
	// (malloc succeeded, its pages were not all charged yet) and the
	// pointer array: at most 2 MiB over.
	got := inuse["leak_block"]
	t.Logf("victim's leak_block live bytes at the kill: %d (limit %d); report:\n%s", got, limit, r.Text())
	if float64(got) < 0.7*float64(limit) || got > int64(limit)+2<<20 {
		t.Errorf("leak_block holds %d live bytes at the kill, want between 70%% of the %d limit and 2 MiB over it", got, limit)
	}
	for _, s := range prof.Sample {
		if s.Label["pid"][0] != strconv.Itoa(pid) || s.Label["cgroup"][0] != dir {
			t.Fatalf("OOM profile sample labels %v, want pid %d and cgroup %s", s.Label, pid, dir)
		}
	}
	txt, _ := os.ReadFile(textPath)
	if !strings.Contains(string(txt), "leak_block") {
		t.Errorf("text report does not show the leaking stack:\n%s", txt)
	}
}

// TestOOMNotTargetIgnored: an OOM of a process that is not a target is not
// reported unless all OOMs were asked for.
func TestOOMNotTargetIgnored(t *testing.T) {
	testprog.RequireRoot(t)
	dir := testCgroup(t, "oom-other", 32<<20)
	leakBin := testprog.Build(t, "oom_leak.c")
	leakyBin := testprog.Build(t, "rec_leaky.c")
	target := testprog.Start(t, leakyBin, nil, "--wait-start", "--wait-end")
	target.Expect(t, "READY")
	for _, all := range []bool{false, true} {
		victim := testprog.Start(t, leakBin, nil, "leak", "1048576")
		victim.Expect(t, "waiting")
		if err := cgroups.AddProcess(dir, victim.Pid()); err != nil {
			t.Fatal(err)
		}
		kills := make(chan *OOMKill, 4)
		s, err := Start(context.Background(), Options{Pids: []int{target.Pid()}, AllOOMs: all, OOM: func(k *OOMKill) { kills <- k }})
		if err != nil {
			t.Fatal(err)
		}
		victim.Send(t, "go")
		victim.Cmd.Wait()
		select {
		case k := <-kills:
			if !all {
				t.Errorf("OOM of non-target pid %d reported without AllOOMs", k.Victim.Pid)
			} else if k.Target || k.Profile != nil || k.Victim.Pid != victim.Pid() {
				t.Errorf("AllOOMs: got %+v, want a non-target report of pid %d without a profile", k, victim.Pid())
			}
		case <-time.After(3 * time.Second):
			if all {
				t.Errorf("AllOOMs: OOM of pid %d not reported", victim.Pid())
			}
		}
		s.Close()
	}
}

// TestFragmentation compares memprof's verdict, made from its own live-bytes
// estimate, with the allocator's own truth (glibc mallinfo2, jemalloc
// stats.allocated) on a heap fragmented on purpose and on one with little
// waste.
func TestFragmentation(t *testing.T) {
	bin := testprog.Build(t, "frag_glibc.c")
	for _, tc := range []struct {
		name  string
		env   []string
		args  []string
		alarm bool
		alloc frag.Allocator
	}{
		{"glibc-fragmented", nil, []string{"frag", "200000", "256", "16"}, true, frag.Glibc},
		{"jemalloc-fragmented", []string{"LD_PRELOAD=" + testprog.Jemalloc}, []string{"frag", "200000", "256", "16"}, true, frag.Jemalloc},
		{"glibc-little-waste", nil, []string{"keep", "200000", "256"}, false, frag.Glibc},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prog := testprog.Start(t, bin, append(tc.env, "FRAG_WAIT=1"), tc.args...)
			prog.Expect(t, "waiting")
			var truth map[string]uint64
			var v frag.Verdict
			record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}}, func(s *Session) {
				prog.Send(t, "go")
				truth = testprog.KeyValues(prog.Expect(t, "ready"))
				p, err := s.Profile()
				if err != nil {
					t.Fatal(err)
				}
				built, err := pprofout.Build(p)
				if err != nil {
					t.Fatal(err)
				}
				reports := s.Fragmentation(built)
				if len(reports) != 1 || reports[0].Err != nil {
					t.Fatalf("fragmentation reports %+v, want one verdict", reports)
				}
				v = reports[0].Verdict
			})
			trueLive := truth["glibc_uordblks"] + truth["glibc_hblkhd"]
			if tc.alloc == frag.Jemalloc {
				trueLive = truth["je_allocated"]
			}
			trueRatio := float64(v.RSS) / float64(trueLive)
			t.Logf("%s: RSS %d, memprof live %d ratio %.2f; allocator's live %d ratio %.2f; %s", tc.name, v.RSS, v.Live, v.Ratio, trueLive, trueRatio, v.Summary)
			if v.Allocator != tc.alloc || !v.Covered {
				t.Fatalf("verdict for allocator %s covered=%v, want %s covered", v.Allocator, v.Covered, tc.alloc)
			}
			// memprof counts requested bytes, the allocator its usable
			// sizes (chunk headers, size classes): within 15%.
			if d := math.Abs(float64(v.Live)-float64(trueLive)) / float64(trueLive); d > 0.15 {
				t.Errorf("memprof live %d vs allocator's %d: %.0f%% apart, tolerance 15%%", v.Live, trueLive, 100*d)
			}
			if v.Alarm != tc.alarm {
				t.Errorf("alarm %v, want %v (ratio %.2f, excess %d)", v.Alarm, tc.alarm, v.Ratio, v.Excess)
			}
			if tc.alarm {
				if v.Ratio < 3 {
					t.Errorf("fragmented heap ratio %.2f, want > 3 (allocator's truth %.2f)", v.Ratio, trueRatio)
				}
				advice := strings.Join(v.Advice, " ")
				want := "malloc_trim"
				if tc.alloc == frag.Jemalloc {
					want = "dirty_decay_ms"
				}
				if !strings.Contains(advice, want) {
					t.Errorf("advice %q does not mention %s", advice, want)
				}
			} else if v.Ratio < 0.9 || v.Ratio > 1.3 {
				t.Errorf("little-waste ratio %.2f, want 0.9-1.3", v.Ratio)
			}
		})
	}
}
