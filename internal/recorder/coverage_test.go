package recorder

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// byPidSite sums a sample type per (pid, immediate caller).
func byPidSite(t *testing.T, p *profile.Profile, sampleType string) map[string]map[string]int64 {
	t.Helper()
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == sampleType {
			idx = i
		}
	}
	out := map[string]map[string]int64{}
	for _, s := range p.Sample {
		name := "?"
		if len(s.Location) > 0 && len(s.Location[0].Line) > 0 {
			name = s.Location[0].Line[0].Function.Name
		}
		pid := s.Label["pid"][0]
		if out[pid] == nil {
			out[pid] = map[string]int64{}
		}
		out[pid][name] += s.Value[idx]
	}
	return out
}

// TestRecordProcessTree: a command's children are followed from their fork
// (each with a copy of its parent's blocks, which it frees) and through
// their execs, each labelled with its own pid; a #! script is started and
// the program it execs profiled.
func TestRecordProcessTree(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "alloc_family.c")
	script := filepath.Join(t.TempDir(), "run.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\nexec "+bin+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		argv     []string
		children int // processes running alloc_family's heap
	}{
		{"forks", []string{bin, "forks", "2"}, 2},
		{"sh-c", []string{"/bin/sh", "-c", bin + "; true"}, 1},
		{"script", []string{script}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var root int
			p := record(t, Options{SampleRate: 1, Command: tc.argv}, func(s *Session) {
				root = s.CommandPid()
				if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
					t.Fatalf("session ended with %q", r)
				}
			})
			inuse := byPidSite(t, p, "inuse_space")
			alloc := byPidSite(t, p, "alloc_space")
			heaps := 0
			for pid, sites := range inuse {
				if _, ok := alloc[pid]["f_small"]; !ok {
					continue
				}
				heaps++
				for _, w := range familyTruth {
					if sites[w.fn] != w.inuse || (w.allocBytes != 0 && alloc[pid][w.fn] != w.allocBytes) {
						t.Errorf("pid %s %s: inuse %d alloc %d, want exactly %d and %d", pid, w.fn, sites[w.fn], alloc[pid][w.fn], w.inuse, w.allocBytes)
					}
				}
				if tc.name == "forks" {
					if pid == fmt.Sprint(root) {
						t.Errorf("the parent %s ran the children's heap", pid)
					}
					// Its copies of the parent's blocks, freed.
					if sites["f_parent"] != 0 {
						t.Errorf("child %s: f_parent inuse %d, want 0 (it freed its copies)", pid, sites["f_parent"])
					}
				}
			}
			if heaps != tc.children {
				t.Errorf("%d processes with the heap in the profile, want %d (pids: %v)", heaps, tc.children, keys(inuse))
			}
			if tc.name == "forks" {
				r := fmt.Sprint(root)
				if inuse[r]["f_parent"] != 3_000_000 || alloc[r]["f_parent"] != 3_000_000 {
					t.Errorf("parent %s: f_parent inuse %d alloc %d, want exactly 3,000,000 both", r, inuse[r]["f_parent"], alloc[r]["f_parent"])
				}
			}
		})
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// verdictOf builds the profile and returns the one report of pid.
func verdictOf(t *testing.T, s *Session, pid int) FragReport {
	t.Helper()
	p, err := s.Profile()
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.Build(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range s.Fragmentation(built) {
		if strings.HasPrefix(r.Scope, fmt.Sprintf("pid %d ", pid)) {
			return r
		}
	}
	t.Fatalf("no fragmentation report for pid %d", pid)
	return FragReport{}
}

// TestVerdictNotHeap: RSS that is not the allocator's (the program's own
// 200 MiB mmap region, 50 MiB of touched thread stacks) raises no alarm:
// only the allocator's share is compared with the 5 MiB live. (The whole
// anonymous RSS would have given ratios of 40 and 10.)
func TestVerdictNotHeap(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "notheap.c")
	for _, mode := range []string{"mmap", "threads"} {
		t.Run(mode, func(t *testing.T) {
			var rep FragReport
			var rssAnon uint64
			record(t, Options{SampleRate: 1, Command: []string{bin, mode, "30"}}, func(s *Session) {
				pid := s.CommandPid()
				defer syscall.Kill(pid, syscall.SIGKILL)
				// Until the program printed "done": its threads are up
				// or its arena is touched (it then sleeps).
				deadline := time.Now().Add(30 * time.Second)
				for {
					pm, err := frag.ReadProcess(pid)
					if err == nil && ((mode == "mmap" && pm.RssAnon > 200<<20) || (mode == "threads" && pm.Threads > 200 && pm.RssAnon > 50<<20)) {
						rssAnon = pm.RssAnon
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("program did not reach its state: %+v %v", pm, err)
					}
					time.Sleep(50 * time.Millisecond)
				}
				time.Sleep(200 * time.Millisecond)
				rep = verdictOf(t, s, pid)
			})
			v := rep.Verdict
			t.Logf("%s: RssAnon %s; %s; verdict: %s", mode, frag.Human(rssAnon), rep.Regions, v.Summary)
			if rep.Err != nil || rep.Regions == nil {
				t.Fatalf("report %+v, want a verdict with the RSS split", rep)
			}
			if v.Alarm || len(v.Advice) > 0 {
				t.Errorf("alarm %v advice %q for a heap without fragmentation", v.Alarm, v.Advice)
			}
			// f_heap's 5 MiB, and glibc's own blocks (stdio buffer,
			// thread control blocks): under 128 KiB.
			if v.Live < 5<<20 || v.Live > 5<<20+128<<10 {
				t.Errorf("live %d, want 5 MiB (f_heap) + < 128 KiB of glibc's own", v.Live)
			}
			// The allocator's share: the 5 MiB of blocks, its heap's
			// pages, and glibc's own start-up allocations.
			if a := rep.Regions.AllocatorRSS(); a < 5<<20 || a > 7<<20 {
				t.Errorf("allocator's RSS %d, want 5-7 MiB", a)
			}
			if mode == "mmap" && rep.Regions.Other < 200<<20 {
				t.Errorf("other mappings %d, want the 200 MiB arena in them", rep.Regions.Other)
			}
			if mode == "threads" && rep.Regions.Stacks < 50<<20 {
				t.Errorf("stacks %d, want the 200 x 256 KiB touched in them", rep.Regions.Stacks)
			}
			if !strings.HasPrefix(rep.Coverage, "complete") {
				t.Errorf("coverage %q, want complete (memprof started it)", rep.Coverage)
			}
			if whole := frag.Assess(frag.Glibc, rssAnon, v.Live, nil); !whole.Alarm {
				t.Errorf("the whole anonymous RSS would not have alarmed either (%s): the test shows nothing", whole.Summary)
			}
		})
	}
}

// TestVerdictPartialCoverage: --pid on a process that allocated 64 MiB
// before the attach. The profile sees only the 5 MiB allocated after; the
// excess could be the unseen blocks, so no alarm and no advice, the figures
// and the reason instead, and the coverage says the blocks before the attach
// are missing.
func TestVerdictPartialCoverage(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "notheap.c")
	prog := testprog.Start(t, bin, nil, "before", "30")
	prog.Expect(t, "ready")
	var rep FragReport
	record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}}, func(s *Session) {
		prog.Send(t, "go")
		prog.Expect(t, "done")
		rep = verdictOf(t, s, prog.Pid())
	})
	v := rep.Verdict
	t.Logf("coverage: %s\nverdict: %s\nsplit: %s", rep.Coverage, v.Summary, rep.Regions)
	if v.Alarm || len(v.Advice) > 0 || v.Withheld == "" || !strings.HasPrefix(v.Summary, "no verdict") {
		t.Errorf("alarm %v advice %q withheld %q, want no verdict with the reason", v.Alarm, v.Advice, v.Withheld)
	}
	if v.Live != 5<<20 {
		t.Errorf("live seen %d, want exactly %d (only what was allocated after the attach)", v.Live, 5<<20)
	}
	if !strings.HasPrefix(rep.Coverage, "partial") || !strings.Contains(rep.Coverage, "before the attach are not in the profile") {
		t.Errorf("coverage %q, want partial, saying the blocks before the attach are missing", rep.Coverage)
	}
}

// TestUnprobedAllocations: a process whose memory grows without a single
// allocator call (its own mmap) is reported in plain words.
func TestUnprobedAllocations(t *testing.T) {
	testprog.RequireRoot(t)
	old := UnprobedAfter
	UnprobedAfter = time.Second
	defer func() { UnprobedAfter = old }()
	bin := testprog.Build(t, "notheap.c")
	var mu sync.Mutex
	var msgs []string
	notify := func(m string) {
		mu.Lock()
		msgs = append(msgs, m)
		mu.Unlock()
	}
	var rep FragReport
	record(t, Options{SampleRate: 1, Command: []string{bin, "late", "30"}, Notify: notify}, func(s *Session) {
		pid := s.CommandPid()
		defer syscall.Kill(pid, syscall.SIGKILL)
		deadline := time.Now().Add(20 * time.Second)
		for (len(rep.Notes) == 0 || !strings.Contains(rep.Notes[0], "grew by")) && time.Now().Before(deadline) {
			time.Sleep(300 * time.Millisecond)
			rep = verdictOf(t, s, pid)
		}
	})
	t.Logf("notes: %q", rep.Notes)
	if len(rep.Notes) == 0 || !strings.Contains(rep.Notes[0], "does not probe") || !strings.Contains(rep.Notes[0], "grew by") {
		t.Errorf("notes %q, want one saying its memory grew while it allocates through something memprof does not probe", rep.Notes)
	}
	mu.Lock()
	defer mu.Unlock()
	found := false
	for _, m := range msgs {
		found = found || strings.Contains(m, "does not probe")
	}
	if !found {
		t.Errorf("the user was not told while recording: %q", msgs)
	}
}

// TestPidChildren: --pid on a process with children says they are not
// profiled; with FollowChildren they are attached (found while they run).
func TestPidChildren(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "alloc_family.c")
	for _, follow := range []bool{false, true} {
		t.Run(fmt.Sprint("follow=", follow), func(t *testing.T) {
			prog := testprog.Start(t, "/bin/sh", nil, "-c", `read x; "$0" 30 & "$0" 30 & echo started; wait`, bin)
			record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}, FollowChildren: follow}, func(s *Session) {
				prog.Send(t, "go")
				prog.Expect(t, "started")
				deadline := time.Now().Add(10 * time.Second)
				var kids int
				for time.Now().Before(deadline) {
					kids = 0
					for _, comm := range s.Targets() {
						if comm == "alloc_family" {
							kids++
						}
					}
					if kids == 2 || !follow && len(childrenOf(prog.Pid())) == 2 {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				rep := verdictOf(t, s, prog.Pid())
				note := strings.Join(rep.Notes, " ")
				if follow {
					if kids != 2 {
						t.Errorf("%d children followed, want 2 (targets %v)", kids, s.Targets())
					}
					if strings.Contains(note, "not profiled") {
						t.Errorf("notes %q say children are not profiled although they are", note)
					}
				} else {
					if kids != 0 {
						t.Errorf("%d children attached without FollowChildren", kids)
					}
					if !strings.Contains(note, "2 child process(es)") || !strings.Contains(note, "--follow-children") {
						t.Errorf("notes %q, want them to say 2 children are not profiled and how to include them", note)
					}
				}
				for _, k := range childrenOf(prog.Pid()) {
					syscall.Kill(k, syscall.SIGKILL)
				}
			})
		})
	}
}

// TestPidExec: --pid on a shell that later execs a program: the exec is
// handled (the shell's image kept with no live blocks, the new program
// attached, its coverage saying so) and the new program's heap, allocated
// once it is attached, is recorded exactly. (Blocks a new program
// allocates before memprof has handled its exec — milliseconds after a
// process event — are counted with the old image: an --pid target is not
// stopped at exec; a command's tree is, see TestRecordProcessTree.)
func TestPidExec(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "exit_soon.cc")
	prog := testprog.Start(t, "/bin/sh", nil, "-c", `read x; exec "$0" --hold 0 --wait-end`, bin)
	pid := prog.Pid()
	var comm, cov string
	p := record(t, Options{SampleRate: 1, Pids: []int{pid}}, func(s *Session) {
		prog.Send(t, "go")
		prog.Expect(t, "READY")
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			comm = s.Targets()[pid]
			if comm == "exit_soon" && s.TargetCounts()[execReplaced] == 1 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		s.mu.Lock()
		if nt := s.procs[pid]; nt != nil {
			cov = nt.cov.describe()
		}
		s.mu.Unlock()
		prog.Send(t, "go")
		prog.Expect(t, "DONE")
		prog.Send(t, "go")
	})
	if comm != "exit_soon" {
		t.Errorf("target's command %q after the exec, want exit_soon", comm)
	}
	if !strings.HasPrefix(cov, "partial: attached after it exec'd exit_soon") {
		t.Errorf("coverage %q, want partial, attached after the exec", cov)
	}
	checkExact(t, p, exitSoonTruth)
}

// TestCommandStrippedStatic: a stripped static executable is refused with
// the reason; one that is not stripped is profiled (TestRecordStaticAllocator).
func TestCommandStrippedStatic(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "alloc_family.c", "-static", "-s")
	s, err := Start(context.Background(), Options{SampleRate: 1, Command: []string{bin}})
	if err == nil {
		s.Close()
		t.Fatal("a stripped static executable was accepted: its allocator cannot be probed")
	}
	if !strings.Contains(err.Error(), "no allocator found") || !strings.Contains(err.Error(), "stripped") {
		t.Errorf("error %q, want 'no allocator found' and why (stripped)", err)
	}
}

// TestCgroupUnprofiledSaid: a process of a followed cgroup that memprof
// cannot attach to (a stripped static executable) is named in the report
// as not profiled, not left out silently.
func TestCgroupUnprofiledSaid(t *testing.T) {
	testprog.RequireRoot(t)
	v1, v2 := cgroups.Root()
	root := v1
	if root == "" {
		root = v2
	}
	dir := filepath.Join(root, fmt.Sprintf("memprof-test-unprof-%d", os.Getpid()))
	if err := cgroups.Create(dir, 0); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })
	bin := testprog.Build(t, "alloc_family.c", "-static", "-s")
	prog := testprog.Start(t, bin, nil, "30")
	if err := cgroups.AddProcess(dir, prog.Pid()); err != nil {
		t.Fatal(err)
	}
	record(t, Options{SampleRate: 1, Cgroups: []string{dir}}, func(s *Session) {
		rep := verdictOf(t, s, prog.Pid())
		if note := strings.Join(rep.Notes, " "); !strings.Contains(note, "not profiled") {
			t.Errorf("report %+v, want a note that the process is not profiled", rep)
		}
	})
}

// TestPidChildrenSkippedCounted: with FollowChildren, the children that
// cannot be followed are counted by cause, once each, as a cgroup's
// processes are (before, they were only named on the terminal, one line
// each, and a zombie child was "no allocator found"): a zombie child is
// skipped_exited_before_attach, a stripped static child skipped_no_allocator.
func TestPidChildrenSkippedCounted(t *testing.T) {
	testprog.RequireRoot(t)
	parent := testprog.Build(t, "kids_unreaped.c")
	static := testprog.Build(t, "kids_unreaped.c", "-static", "-s")
	prog := testprog.Start(t, parent, nil, static)
	prog.Expect(t, "started")
	var counts map[string]uint64
	var msgs []string
	var mu sync.Mutex
	notify := func(m string) {
		mu.Lock()
		msgs = append(msgs, m)
		mu.Unlock()
	}
	record(t, Options{SampleRate: 1, Pids: []int{prog.Pid()}, FollowChildren: true, Notify: notify}, func(s *Session) {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			counts = s.TargetCounts()
			if counts[skipNoAllocator] > 0 && counts[skipGoneAtAttach] > 0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(time.Second) // more polls: nothing counted twice
		counts = s.TargetCounts()
		prog.Send(t, "go")
		prog.Expect(t, "done")
	})
	if counts[skipNoAllocator] != 1 || counts[skipGoneAtAttach] != 1 {
		t.Errorf("counts %v, want %s=1 (the static child) and %s=1 (the zombie)", counts, skipNoAllocator, skipGoneAtAttach)
	}
	mu.Lock()
	defer mu.Unlock()
	skips := 0
	for _, m := range msgs {
		if strings.Contains(m, "skipping process") {
			skips++
		}
	}
	if skips != 1 {
		t.Errorf("%d children named as skipped, want 1 (the static one; the zombie is counted only): %q", skips, msgs)
	}
}
