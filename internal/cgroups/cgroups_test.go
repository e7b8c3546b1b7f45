package cgroups

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
)

const mib = 1 << 20

// v1Root returns the v1 memory controller mount, failing the test when the
// host has none (CI hosts are hybrid, as the field notes describe).
func v1Root(t *testing.T) string {
	t.Helper()
	testprog.RequireRoot(t)
	v1, _ := Root()
	if v1 == "" {
		t.Fatalf("no cgroup v1 memory controller under %s: these tests need the hybrid layout of the CI hosts", Base)
	}
	return v1
}

// newCgroup creates a fresh memory cgroup under parent, removed at cleanup.
func newCgroup(t *testing.T, parent string, limit uint64) string {
	t.Helper()
	dir := filepath.Join(parent, fmt.Sprintf("memprof-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := Create(dir, limit); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Remove(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dir
}

// startGated starts a testdata/oom_leak process that waits on stdin before
// it allocates, so it can be moved into a cgroup first.
func startGated(t *testing.T, bin string, args ...string) *testprog.Proc {
	t.Helper()
	g := testprog.Start(t, bin, nil, args...)
	g.Expect(t, "waiting")
	return g
}

func TestRootAndOfProcess(t *testing.T) {
	v1 := v1Root(t)
	_, v2 := Root()
	t.Logf("v1 memory root %q, v2 root %q", v1, v2)
	m1, m2, err := OfProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if m1 == "" || !strings.HasPrefix(m1, "/") {
		t.Fatalf("OfProcess(self) v1 memory path = %q, want an absolute cgroup path from /proc/self/cgroup", m1)
	}
	pids, err := Procs(filepath.Join(v1, m1), false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(pids, os.Getpid()) {
		t.Fatalf("Procs(%s) = %v does not contain the test process %d although /proc/self/cgroup puts it there", filepath.Join(v1, m1), pids, os.Getpid())
	}
	if v2 != "" {
		pids, err := Procs(filepath.Join(v2, m2), true)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(pids, os.Getpid()) {
			t.Fatalf("Procs(%s, recursive) = %d pids, without the test process %d", filepath.Join(v2, m2), len(pids), os.Getpid())
		}
	}
}

// TestStatsOfKnownProcess moves a process that then allocates and touches
// exactly 24 MiB into a fresh cgroup limited to 64 MiB, and checks the
// figures ReadStats reports against that truth.
func TestStatsOfKnownProcess(t *testing.T) {
	v1 := v1Root(t)
	bin := testprog.Build(t, "oom_leak.c")
	dir := newCgroup(t, v1, 64*mib)

	st, err := ReadStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != 1 || st.Limit != 64*mib || st.Path != dir {
		t.Fatalf("empty cgroup: Version %d Limit %d Path %s, want 1, exactly %d (64 MiB as written), %s", st.Version, st.Limit, st.Path, 64*mib, dir)
	}

	g := startGated(t, bin, "idle", fmt.Sprint(24*mib))
	if err := AddProcess(dir, g.Pid()); err != nil {
		t.Fatal(err)
	}
	g.Send(t, "go")
	g.Expect(t, "ready")

	pids, err := Procs(dir, false)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(pids, []int{g.Pid()}) {
		t.Fatalf("Procs(%s) = %v, want exactly [%d]", dir, pids, g.Pid())
	}
	rel, _, err := OfProcess(g.Pid())
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Join(v1, rel) != dir {
		t.Fatalf("OfProcess(%d) v1 memory = %q, want %q below %s", g.Pid(), rel, strings.TrimPrefix(dir, v1), v1)
	}
	id, err := ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := PathByID(v1, id)
	if err != nil || got != dir {
		t.Fatalf("PathByID(%s, %d) = %q, %v; want %s", v1, id, got, err, dir)
	}

	st, err = ReadStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cgroup with one process holding 24 MiB: %+v", *st)
	// Truth: 24 MiB touched after the move; the C runtime's own pages
	// (stack, libc data) add well under 2 MiB.
	if st.Anon < 24*mib || st.Anon > 26*mib {
		t.Errorf("Anon = %d, want 24 MiB..26 MiB (24 MiB touched + < 2 MiB runtime)", st.Anon)
	}
	if st.Usage < st.Anon || st.Usage > 32*mib {
		t.Errorf("Usage = %d, want >= Anon (%d) and <= 32 MiB (anon + page tables, kernel objects)", st.Usage, st.Anon)
	}
	if st.WorkingSet != st.Usage-min(st.Usage, st.InactiveFile) {
		t.Errorf("WorkingSet = %d, want Usage %d - InactiveFile %d exactly", st.WorkingSet, st.Usage, st.InactiveFile)
	}
	if st.OOMKills != 0 || st.Failcnt != 0 {
		t.Errorf("OOMKills %d Failcnt %d, want 0 and 0: 24 MiB stays far below the 64 MiB limit", st.OOMKills, st.Failcnt)
	}
	// AnonBytes reads the same figure from memory.stat alone (the process
	// sleeps: it stays within a page of what ReadStats saw).
	anon, err := AnonBytes(dir)
	if err != nil {
		t.Fatal(err)
	}
	if d := int64(anon) - int64(st.Anon); d < -4096 || d > 4096 {
		t.Errorf("AnonBytes = %d, ReadStats Anon = %d: want the same figure ±1 page", anon, st.Anon)
	}

	// Remove kills what is left and deletes the directory.
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("after Remove, stat %s: %v, want not-exist", dir, err)
	}
	err = g.Cmd.Wait()
	ws, _ := g.Cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("process left in the cgroup ended with %v, want killed by SIGKILL from Remove", err)
	}
}

// TestNestedLimit checks that an unlimited child reports its limited parent
// as Ancestor.
func TestNestedLimit(t *testing.T) {
	v1 := v1Root(t)
	parent := newCgroup(t, v1, 48*mib)
	child := filepath.Join(parent, "child")
	if err := Create(child, 0); err != nil {
		t.Fatal(err)
	}
	st, err := ReadStats(child)
	if err != nil {
		t.Fatal(err)
	}
	if st.Limit != 0 {
		t.Fatalf("child Limit = %d, want 0 (unlimited)", st.Limit)
	}
	if st.Ancestor == nil || st.Ancestor.Path != parent || st.Ancestor.Limit != 48*mib {
		t.Fatalf("child Ancestor = %+v, want the parent %s with its limit of exactly 48 MiB", st.Ancestor, parent)
	}
	unlimited := newCgroup(t, v1, 0)
	st, err = ReadStats(unlimited)
	if err != nil {
		t.Fatal(err)
	}
	if st.Limit != 0 || st.Ancestor != nil {
		t.Fatalf("cgroup without limit under the root: Limit %d Ancestor %+v, want 0 and nil (the memory root has no limit)", st.Limit, st.Ancestor)
	}
}

// TestProcsRecursive: a process in a child cgroup is listed by the
// recursive Procs of its parent (subdirs skips listing leaves by their
// link count) and not by the plain one.
func TestProcsRecursive(t *testing.T) {
	v1 := v1Root(t)
	bin := testprog.Build(t, "oom_leak.c")
	parent := newCgroup(t, v1, 0)
	child := filepath.Join(parent, "a", "b")
	for _, d := range []string{filepath.Dir(child), child} {
		if err := Create(d, 0); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { Remove(child); Remove(filepath.Dir(child)) })
	g := startGated(t, bin, "idle", fmt.Sprint(mib))
	if err := AddProcess(child, g.Pid()); err != nil {
		t.Fatal(err)
	}
	if got := subdirs(parent); !slices.Equal(got, []string{parent, filepath.Dir(child), child}) {
		t.Errorf("subdirs(%s) = %v, want the parent, a and a/b", parent, got)
	}
	if pids, err := Procs(parent, true); err != nil || !slices.Equal(pids, []int{g.Pid()}) {
		t.Errorf("Procs(parent, recursive) = %v, %v; want [%d]", pids, err, g.Pid())
	}
	if pids, err := Procs(parent, false); err != nil || len(pids) != 0 {
		t.Errorf("Procs(parent) = %v, %v; want none", pids, err)
	}
	g.Cmd.Process.Kill()
	g.Cmd.Wait()
}

func TestReadFileRaw(t *testing.T) {
	dir := t.TempDir()
	var buf []byte
	for _, n := range []int{0, 5, 4096, 4097, 100000} {
		want := make([]byte, n)
		for i := range want {
			want[i] = byte('0' + i%10)
		}
		p := filepath.Join(dir, fmt.Sprint(n))
		if err := os.WriteFile(p, want, 0o644); err != nil {
			t.Fatal(err)
		}
		got, err := readFileRaw(p, &buf)
		if err != nil || string(got) != string(want) {
			t.Errorf("readFileRaw of %d bytes: %d bytes, %v", n, len(got), err)
		}
	}
	if _, err := readFileRaw(filepath.Join(dir, "nope"), &buf); !os.IsNotExist(err) {
		t.Errorf("readFileRaw of a missing file: %v, want not-exist", err)
	}
}

func TestStatField(t *testing.T) {
	v1 := []byte("cache 4096\nrss 8192\nrss_huge 0\ntotal_cache 4096\ntotal_rss 12288\n")
	v2 := []byte("anon 65536\nfile 0\nanon_thp 0\n")
	for _, c := range []struct {
		data []byte
		key  string
		want uint64
		ok   bool
	}{
		{v1, "total_rss", 12288, true}, {v1, "rss", 8192, true}, {v1, "anon", 0, false},
		{v2, "anon", 65536, true}, {v2, "anon_thp", 0, true}, {v2, "total_rss", 0, false},
		{[]byte("anon x\n"), "anon", 0, false}, {[]byte("anon"), "anon", 0, false}, {nil, "anon", 0, false},
	} {
		if v, ok := statField(c.data, c.key); v != c.want || ok != c.ok {
			t.Errorf("statField(%q, %s) = %d, %t; want %d, %t", c.data, c.key, v, ok, c.want, c.ok)
		}
	}
}

// TestReadStatsVanished removes a cgroup before and while it is read.
func TestReadStatsVanished(t *testing.T) {
	v1 := v1Root(t)
	dir := newCgroup(t, v1, 16*mib)
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	_, err := ReadStats(dir)
	if err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("ReadStats of a removed cgroup: err = %v, want an error naming %s", err, dir)
	}
	t.Logf("removed before read: %v", err)

	// Race removal against reading: every read either succeeds with the
	// right path and limit or fails naming the cgroup.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = Create(dir, 16*mib)
			_ = os.Remove(dir)
		}
	}()
	var ok, failed int
	for i := 0; i < 300; i++ {
		st, err := ReadStats(dir)
		switch {
		case err != nil:
			failed++
			if !strings.Contains(err.Error(), dir) {
				t.Errorf("error does not name the cgroup %s: %v", dir, err)
			}
		default:
			ok++
			if st.Path != dir || (st.Limit != 16*mib && st.Limit != 0) {
				t.Errorf("stats read during removal: Path %s Limit %d, want %s and 16 MiB (or 0 if read before the limit was written)", st.Path, st.Limit, dir)
			}
		}
	}
	close(stop)
	wg.Wait()
	_ = os.Remove(dir)
	t.Logf("300 reads racing removal: %d succeeded, %d failed with the path named", ok, failed)
	if failed == 0 {
		t.Errorf("no read saw the cgroup vanish in 300 tries; the race test did not exercise removal")
	}
}

// TestV2 reads a v2 directory. The hybrid CI hosts have no memory controller
// in the v2 tree (it stays bound to v1), so ReadStats must say so; on a pure
// v2 host the test checks real figures instead.
func TestV2(t *testing.T) {
	testprog.RequireRoot(t)
	_, v2 := Root()
	if v2 == "" {
		t.Fatalf("no cgroup v2 hierarchy under %s", Base)
	}
	_, rel, err := OfProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(v2, rel)
	id, err := ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := PathByID(v2, id); err != nil || p != dir {
		t.Fatalf("PathByID(%s, %d) = %q, %v; want %s", v2, id, p, err, dir)
	}
	if v, err := Version(dir); err != nil || v != 2 {
		t.Fatalf("Version(%s) = %d, %v; want 2", dir, v, err)
	}
	ctrl, err := os.ReadFile(filepath.Join(v2, "cgroup.controllers"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(strings.Fields(string(ctrl)), "memory") {
		// Hybrid host: the memory controller is bound to v1.
		_, err := ReadStats(dir)
		if err == nil || !strings.Contains(err.Error(), "no memory controller") || !strings.Contains(err.Error(), dir) {
			t.Fatalf("ReadStats(%s) without memory controller: err = %v, want an error naming the dir and the missing memory controller", dir, err)
		}
		t.Logf("v2 tree has no memory controller on this host (controllers: %q), so v2 memory figures cannot be measured here: %v", strings.TrimSpace(string(ctrl)), err)
		return
	}
	// Pure v2 host: a limited cgroup read back through the v2 path.
	cg := newCgroup(t, v2, 64*mib)
	st, err := ReadStats(cg)
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != 2 || st.Limit != 64*mib {
		t.Fatalf("v2 cgroup %s: Version %d Limit %d, want 2 and exactly 64 MiB as written to memory.max", cg, st.Version, st.Limit)
	}
}

func TestParseProcCgroup(t *testing.T) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	m1, m2, err := parseProcCgroup(data)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("/proc/self/cgroup:\n%s=> memory %q, v2 %q", data, m1, m2)
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "0::") && m2 != strings.TrimPrefix(l, "0::") {
			t.Fatalf("v2 path %q, want %q from line %q", m2, strings.TrimPrefix(l, "0::"), l)
		}
	}
}
