package rss

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// A Go program leaking in a 96 MiB v1 memory cgroup is OOM-killed; the
// post-mortem RSS profile taken at the kill names the leaking function and
// holds about the limit.
func TestOOMPostMortemGo(t *testing.T) {
	testprog.RequireRoot(t)
	v1, _ := cgroups.Root()
	if v1 == "" {
		t.Fatal("no v1 memory controller mounted (this host has one at /sys/fs/cgroup/memory)")
	}
	bin := t.TempDir() + "/rss_goleak"
	if out, err := exec.Command("go", "build", "-o", bin, testprog.Testdata("rss_goleak")).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	const limit = 96 << 20
	dir := filepath.Join(v1, fmt.Sprintf("memprof-rss-oom-%d", os.Getpid()))
	if err := cgroups.Create(dir, limit); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })

	kills := make(chan *OOMKill, 4)
	s, err := Start(context.Background(), Options{Cgroups: []string{dir}, AllowEmpty: true,
		OOM: func(k *OOMKill) { kills <- k }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.OOMSupported() {
		t.Fatal("tp_btf/mark_victim did not attach (Linux 6.8+ has it)")
	}
	k := startWaiting(t, bin, "-oom")
	if err := cgroups.AddProcess(dir, k.cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(k.stdin, "go")
	var kill *OOMKill
	select {
	case kill = <-kills:
	case <-time.After(60 * time.Second):
		t.Fatal("no OOM kill within 60 s")
	}
	if kill.Pid != k.cmd.Process.Pid || !kill.Target || kill.Profile == nil {
		t.Fatalf("OOM kill of pid %d (target %v, profile %v), want pid %d with a profile", kill.Pid, kill.Target, kill.Profile != nil, k.cmd.Process.Pid)
	}
	path, err := WriteOOM(kill, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rss, _, total := byFunction(built, []string{"main.leakSlices"})
	t.Logf("post-mortem %s: main.leakSlices %.1f MiB of %.1f MiB rss_space; victim anon RSS %.1f MiB; memcg %s",
		filepath.Base(path), float64(rss["main.leakSlices"])/mib, float64(total)/mib, float64(kill.AnonRSS)/mib, kill.Memcg)
	// Default rate: the leak is most of the 96 MiB limit; the Poisson
	// estimate of ~90 MiB in 4 KiB pages has sd ~6 MiB.
	if got := rss["main.leakSlices"]; got < 60*mib || got > 130*mib {
		t.Errorf("main.leakSlices holds %.1f MiB in the post-mortem, want most of the 96 MiB limit", float64(got)/mib)
	}
	if kill.Memcg != dir {
		t.Errorf("victim memcg %q, want %q", kill.Memcg, dir)
	}
}

// A process in a v2 cgroup (the controller-less unified hierarchy of this
// hybrid host) is recorded through the BPF v2-cgroup filter.
func TestCgroupV2Target(t *testing.T) {
	testprog.RequireRoot(t)
	_, v2 := cgroups.Root()
	if v2 == "" {
		t.Fatal("no cgroup v2 hierarchy mounted")
	}
	dir := filepath.Join(v2, fmt.Sprintf("memprof-rss-v2-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cgroups.Remove(dir) })
	bin := testprog.Build(t, "rss_known.c")
	k := startWaiting(t, bin)
	if err := cgroups.AddProcess(dir, k.cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	s, err := Start(context.Background(), Options{SampleRate: 1, Cgroups: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	k.run(t)
	p, _, err := s.Profile(nil)
	if err != nil {
		t.Fatal(err)
	}
	built, err := pprofout.BuildRSS(p)
	if err != nil {
		t.Fatal(err)
	}
	rss, _, _ := byFunction(built, knownFuncs)
	t.Logf("v2 cgroup target: own_mmap %.2f MiB (truth 24)", float64(rss["own_mmap"])/mib)
	if got := float64(rss["own_mmap"]); got < 0.97*24*mib || got > 1.03*24*mib {
		t.Errorf("own_mmap rss_space %.2f MiB, want 24", got/mib)
	}
}
