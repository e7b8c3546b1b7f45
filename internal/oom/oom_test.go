package oom

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/frag"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

const mib = 1 << 20

func v1Root(t *testing.T) string {
	t.Helper()
	testprog.RequireRoot(t)
	v1, _ := cgroups.Root()
	if v1 == "" {
		t.Fatalf("no cgroup v1 memory controller under %s: these tests need the hybrid layout of the CI hosts", cgroups.Base)
	}
	return v1
}

func newCgroup(t *testing.T, dir string, limit uint64) {
	t.Helper()
	if err := cgroups.Create(dir, limit); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// leakViaShell starts a shell in cgroup dir that runs oom_leak in leak mode
// (1 MiB blocks) and reports the leaker's pid and exit status as a shell
// sees it. It returns the leaker's pid, its exit status and the most it
// reported leaked before it died.
func leakViaShell(t *testing.T, bin, dir string) (pid int, exit string, leaked uint64, sh *testprog.Proc) {
	t.Helper()
	sh = testprog.Start(t, "/bin/sh", nil, "-c", `read x; echo go | "$0" leak 1048576 & echo "pid=$!"; wait $!; echo "exit=$?"; read y`, bin)
	if err := cgroups.AddProcess(dir, sh.Pid()); err != nil {
		t.Fatal(err)
	}
	sh.Send(t, "go")
	l, _ := sh.Until(t, "pid=", 10*time.Second)
	pid, _ = strconv.Atoi(strings.TrimPrefix(l, "pid="))
	l, out := sh.Until(t, "exit=", 30*time.Second)
	for _, o := range out {
		if n, ok := strings.CutPrefix(o, "leaked "); ok {
			leaked, _ = strconv.ParseUint(n, 10, 64)
		}
	}
	return pid, strings.TrimPrefix(l, "exit="), leaked, sh
}

// TestCgroupLimitOOM drives a real memcg OOM kill: oom_leak leaks 1 MiB
// blocks in a cgroup limited to 64 MiB until the kernel kills it.
func TestCgroupLimitOOM(t *testing.T) {
	v1 := v1Root(t)
	bin := testprog.Build(t, "oom_leak.c")
	dir := filepath.Join(v1, fmt.Sprintf("memprof-oom-test-%d", os.Getpid()))
	newCgroup(t, dir, 64*mib)

	start := time.Now()
	pid, exit, leaked, sh := leakViaShell(t, bin, dir)
	t.Logf("leaker %d ended with shell status %s after reporting %d bytes leaked (%.1fs)", pid, exit, leaked, time.Since(start).Seconds())
	if exit != "137" {
		t.Fatalf("leaker exit status %s, want 137 (128 + SIGKILL from the memcg OOM killer)", exit)
	}
	// Truth: it leaked in 1 MiB steps up to the 64 MiB limit; the last
	// report is every 8 MiB, so it reached at least 40 MiB before dying.
	if leaked < 40*mib || leaked > 64*mib {
		t.Errorf("leaked %d bytes before the kill, want 40..64 MiB (limit 64 MiB, progress printed every 8 MiB)", leaked)
	}
	if err := sh.Cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the shell in the same cgroup (1 MiB RSS) was killed too: %v; the OOM killer should pick only the leaker", err)
	}

	st, err := cgroups.ReadStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after the kill: %+v", *st)
	if st.Limit != 64*mib {
		t.Errorf("Limit %d, want exactly %d (64 MiB as written)", st.Limit, 64*mib)
	}
	if st.OOMKills != 1 || st.Failcnt == 0 {
		t.Errorf("OOMKills %d Failcnt %d, want exactly 1 kill and > 0 failed charges after one memcg OOM kill", st.OOMKills, st.Failcnt)
	}
	if st.MaxUsage < 63*mib || st.MaxUsage > 64*mib {
		t.Errorf("MaxUsage %d, want 63..64 MiB: the leaker pushed usage to the 64 MiB limit", st.MaxUsage)
	}
	if k := Classify(st); k != KindCgroupLimit {
		t.Fatalf("Classify = %s, want %s", k, KindCgroupLimit)
	}

	id, err := cgroups.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := New(Victim{Time: start, Pid: pid, Comm: "oom_leak", MemcgID: id, CgroupID: 1, AnonRSS: leaked})
	if r.CgroupPath != dir || r.Kind != KindCgroupLimit || r.Limit != 64*mib || r.CgroupVersion != 1 {
		t.Fatalf("report: path %s kind %s limit %d version %d, want %s, %s, 64 MiB, 1; notes %q", r.CgroupPath, r.Kind, r.Limit, r.CgroupVersion, dir, KindCgroupLimit, r.Notes)
	}
	v := frag.Assess(frag.Glibc, leaked, leaked, nil)
	r.Fragmentation = &v
	// Stacks and profile path come from the BPF side in production; these
	// stand-ins only check that the report carries and prints them.
	r.TopStacks = []pprofout.StackRow{{Value: int64(leaked), Objects: int64(leaked / mib), Frames: []string{"leak_block oom_leak.c:24", "main oom_leak.c:59"}, Percent: 100}}
	r.ProfilePath = "/var/lib/memprof/" + FileBase(r.Time, r.Comm, r.Pid) + ".pb.gz"

	out := t.TempDir()
	base := FileBase(r.Time, r.Comm, r.Pid)
	jp, tp, err := r.WriteFiles(out, base)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ReadJSON(jp)
	if err != nil {
		t.Fatal(err)
	}
	if back.Pid != pid || back.Kind != KindCgroupLimit || back.Limit != 64*mib || back.Stats == nil || back.Stats.OOMKills != st.OOMKills ||
		len(back.TopStacks) != 1 || back.TopStacks[0].Frames[0] != "leak_block oom_leak.c:24" || back.Fragmentation == nil || !back.Time.Equal(r.Time) {
		t.Fatalf("JSON round trip lost data: %+v", back)
	}
	text, err := os.ReadFile(tp)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s:\n%s", tp, text)
	for _, want := range []string{"cgroup-limit", "64.0 MiB", fmt.Sprintf("oom_leak (pid %d)", pid), dir, "leak_block", "oom_kill"} {
		if !strings.Contains(string(text), want) {
			t.Errorf("text report lacks %q", want)
		}
	}
	ents, _ := os.ReadDir(out)
	if len(ents) != 2 {
		t.Errorf("report directory holds %d entries, want exactly the .json and .txt (no temporary files left)", len(ents))
	}
}

// TestOOMWithBystander: two processes in one cgroup under a limited parent;
// the leaker is killed, the bystander (8 MiB) survives, and the limit is
// found on the ancestor.
func TestOOMWithBystander(t *testing.T) {
	v1 := v1Root(t)
	bin := testprog.Build(t, "oom_leak.c")
	parent := filepath.Join(v1, fmt.Sprintf("memprof-oom-parent-%d", os.Getpid()))
	newCgroup(t, parent, 64*mib)
	child := filepath.Join(parent, "app")
	if err := cgroups.Create(child, 0); err != nil {
		t.Fatal(err)
	}

	by := testprog.Start(t, bin, nil, "idle", strconv.Itoa(8*mib))
	by.Until(t, "waiting", 10*time.Second)
	if err := cgroups.AddProcess(child, by.Pid()); err != nil {
		t.Fatal(err)
	}
	by.Send(t, "go")
	by.Until(t, "ready", 10*time.Second)

	pid, exit, leaked, _ := leakViaShell(t, bin, child)
	t.Logf("leaker %d: shell status %s, %d bytes leaked", pid, exit, leaked)
	if exit != "137" {
		t.Fatalf("leaker exit status %s, want 137 (SIGKILL by the OOM killer)", exit)
	}
	if err := by.Cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("bystander %d died too (%v); the OOM killer should have taken only the leaker", by.Pid(), err)
	}
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", by.Pid())); err != nil || strings.Contains(string(st), ") Z ") {
		t.Fatalf("bystander not alive after the OOM kill: %q %v", st, err)
	}
	procs, err := cgroups.Procs(child, false)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range procs {
		found = found || p == by.Pid()
	}
	if !found {
		t.Fatalf("bystander %d not in %s any more: %v", by.Pid(), child, procs)
	}

	st, err := cgroups.ReadStats(child)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("child after the kill: %+v; ancestor: %+v", *st, st.Ancestor)
	if st.Limit != 0 || st.Ancestor == nil || st.Ancestor.Path != parent || st.Ancestor.Limit != 64*mib {
		t.Fatalf("child Limit %d Ancestor %+v, want 0 and the parent %s with exactly 64 MiB", st.Limit, st.Ancestor, parent)
	}
	// v1 counts oom_kill on the victim's own memcg and failed charges on
	// the limited one.
	if st.OOMKills != 1 || st.Ancestor.Failcnt == 0 || st.Ancestor.MaxUsage < 63*mib {
		t.Errorf("oom_kill child %d, parent failcnt %d, parent peak %d: want 1 kill recorded on the victim's cgroup, failed charges and a 63..64 MiB peak at the limited parent", st.OOMKills, st.Ancestor.Failcnt, st.Ancestor.MaxUsage)
	}
	// The bystander's 8 MiB is still charged: truth for Anon.
	if st.Anon < 8*mib || st.Anon > 12*mib {
		t.Errorf("child anon %d after the kill, want 8..12 MiB (the bystander's 8 MiB and its runtime; the leaker's memory freed)", st.Anon)
	}
	if k := Classify(st); k != KindCgroupLimit {
		t.Fatalf("Classify = %s, want %s (the parent's limit applied)", k, KindCgroupLimit)
	}
	id, _ := cgroups.ID(child)
	r := New(Victim{Pid: pid, Comm: "oom_leak", MemcgID: id})
	if r.Kind != KindCgroupLimit || r.CgroupPath != child || r.Limit != 64*mib || len(r.Notes) == 0 || !strings.Contains(r.Notes[0], parent) {
		t.Fatalf("report kind %s path %s limit %d notes %q, want cgroup-limit, %s, the parent's 64 MiB and a note naming %s", r.Kind, r.CgroupPath, r.Limit, r.Notes, child, parent)
	}
}

// TestHostKind: a cgroup without any limit (and no limited ancestor) cannot
// cause an OOM kill, whatever it holds.
func TestHostKind(t *testing.T) {
	v1 := v1Root(t)
	bin := testprog.Build(t, "oom_leak.c")
	dir := filepath.Join(v1, fmt.Sprintf("memprof-oom-host-%d", os.Getpid()))
	newCgroup(t, dir, 0)
	p := testprog.Start(t, bin, nil, "idle", strconv.Itoa(4*mib))
	p.Until(t, "waiting", 10*time.Second)
	if err := cgroups.AddProcess(dir, p.Pid()); err != nil {
		t.Fatal(err)
	}
	p.Send(t, "go")
	p.Until(t, "ready", 10*time.Second)
	st, err := cgroups.ReadStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k := Classify(st); k != KindHost || st.Limit != 0 || st.Anon < 4*mib {
		t.Fatalf("unlimited cgroup with 4 MiB: Classify %s, Limit %d, Anon %d; want host, 0, >= 4 MiB", k, st.Limit, st.Anon)
	}
	if Classify(nil) != KindHost {
		t.Fatalf("Classify(nil) = %s, want host", Classify(nil))
	}
	// The victim is found through /proc while it lives even without ids.
	r := New(Victim{Pid: p.Pid(), Comm: "oom_leak"})
	if r.CgroupPath != dir || r.Kind != KindHost {
		t.Fatalf("report of a live process without ids: path %q kind %s notes %q, want %s and host", r.CgroupPath, r.Kind, r.Notes, dir)
	}
	// A vanished victim and cgroup: kind host with an explanation.
	r = New(Victim{Pid: 1 << 30, Comm: "gone", MemcgID: 1 << 40})
	if r.Kind != KindHost || len(r.Notes) == 0 {
		t.Fatalf("report of an unknown victim: kind %s notes %q, want host and an explanation", r.Kind, r.Notes)
	}
}

func TestFileBase(t *testing.T) {
	tm := time.Date(2026, 11, 22, 23, 30, 0, 0, time.FixedZone("CET", 3600))
	for _, c := range []struct {
		comm string
		want string
	}{
		{"leaker", "oom-20261122T223000-leaker-1234"},
		{"kworker/0:1 x", "oom-20261122T223000-kworker_0_1_x-1234"},
		{"../..", "oom-20261122T223000-_-1234"},
		{"", "oom-20261122T223000-unknown-1234"},
	} {
		if got := FileBase(tm, c.comm, 1234); got != c.want {
			t.Errorf("FileBase(%q) = %q, want %q (UTC time, comm reduced to [A-Za-z0-9._-])", c.comm, got, c.want)
		}
	}
}
