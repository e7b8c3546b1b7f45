package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
	"github.com/memprof/memprof/pprofout"
)

// buildMemprof builds the command as a user gets it.
func buildMemprof(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "memprof")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestRecordAndReport runs `memprof record -- cmd` and `memprof report` the
// way the README shows and checks what the user sees.
func TestRecordAndReport(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	demo := testprog.Build(t, "demo_server.c")
	dir := t.TempDir()
	cmd := exec.Command(memprof, "record", "--", demo)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("memprof record: %v\n%s", err, out)
	}
	s := string(out)
	for _, want := range []string{"probing ", "command exited with status 0", "top ", "session_open", "cache_put", "view it with: go tool pprof -http=: memprof-demo_server-"} {
		if !strings.Contains(s, want) {
			t.Errorf("record output lacks %q:\n%s", want, s)
		}
	}
	files, _ := filepath.Glob(filepath.Join(dir, "memprof-demo_server-*.pb.gz"))
	if len(files) != 1 {
		t.Fatalf("default output file: found %v, want one memprof-demo_server-<time>.pb.gz", files)
	}
	p, err := pprofout.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	rows, err := pprofout.Top(p, "inuse_space", 1)
	if err != nil || len(rows) == 0 || !strings.HasPrefix(rows[0].Frames[0], "session_open") {
		t.Fatalf("top live stack %v (%v), want session_open (the leak)", rows, err)
	}
	// session_open leaks 20000 x 4 KiB = 81.92 MB; at the default rate the
	// estimate has a standard deviation of ~8%: allow 4 of them.
	if v := float64(rows[0].Value); v < 0.68*81.92e6 || v > 1.32*81.92e6 {
		t.Errorf("session_open live bytes %.0f, want 81.92 MB +-32%%", v)
	}
	rep, err := exec.Command(memprof, "report", "--top", "3", files[0]).CombinedOutput()
	if err != nil {
		t.Fatalf("memprof report: %v\n%s", err, rep)
	}
	// The demo keeps two stacks; at the default rate one of libc's stdio
	// buffers is sampled now and then (a 4 KiB block: p = 1-exp(-4096/524288)
	// ~ 0.8%), so the report may list a third.
	for _, want := range []string{"stacks by inuse_space", "session_open", "cache_put", "fragmentation:", "at exit: allocator=glibc"} {
		if !strings.Contains(string(rep), want) {
			t.Errorf("report output lacks %q:\n%s", want, rep)
		}
	}
}

// TestInterruptWritesProfile: Ctrl-C (SIGINT) during a recording without
// --duration still writes the profile.
func TestInterruptWritesProfile(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	leaky := testprog.Build(t, "rec_leaky.c")
	target := testprog.Start(t, leaky, nil, "--wait-start", "--wait-end")
	target.Expect(t, "READY")
	file := filepath.Join(t.TempDir(), "heap.pb.gz")
	rec := exec.Command(memprof, "record", "--sample-rate", "1", "--pid", strconv.Itoa(target.Pid()), "-o", file)
	var buf strings.Builder
	rec.Stdout, rec.Stderr = &buf, &buf
	if err := rec.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(buf.String(), "probing ") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	target.Send(t, "go")
	target.Expect(t, "DONE")
	rec.Process.Signal(syscall.SIGINT)
	if err := rec.Wait(); err != nil {
		t.Fatalf("memprof after SIGINT: %v\n%s", err, buf.String())
	}
	if !strings.Contains(buf.String(), "stopped: interrupted") {
		t.Errorf("output does not say it was interrupted:\n%s", buf.String())
	}
	p, err := pprofout.ReadFile(file)
	if err != nil {
		t.Fatalf("no profile after SIGINT: %v\n%s", err, buf.String())
	}
	rows, _ := pprofout.Top(p, "inuse_space", 1)
	if len(rows) == 0 || rows[0].Value != 2097152 || !strings.HasPrefix(rows[0].Frames[0], "grow_realloc") {
		t.Errorf("top live stack %v, want grow_realloc with 2097152 bytes (rate 1)", rows)
	}
}

// TestUserErrors checks the messages for input a user gets wrong.
func TestUserErrors(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"record", "--pid", "999999999"}, "process 999999999 not found"},
		{[]string{"record", "--cgroup", "/sys/fs/cgroup/memory/nope-memprof"}, "cgroup /sys/fs/cgroup/memory/nope-memprof does not exist"},
		{[]string{"record"}, "nothing to record"},
		{[]string{"record", "--sample-rate", "0", "--pid", "1"}, "--sample-rate must be at least 1"},
		{[]string{"record", "--stack-mode", "magic", "--pid", strconv.Itoa(os.Getpid())}, "unknown stack mode"},
		{[]string{"record", "--pod", "no-such-pod-xyz"}, "no-such-pod-xyz"},
		{[]string{"report", "/etc/hostname"}, "is not a pprof profile"},
		{[]string{"report"}, "exactly one profile file"},
	} {
		out, err := exec.Command(memprof, tc.args...).CombinedOutput()
		if err == nil {
			t.Errorf("memprof %v succeeded, want an error", tc.args)
			continue
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("memprof %v: %q, want it to say %q", tc.args, strings.TrimSpace(string(out)), tc.want)
		}
	}
}

// TestRecordPod: `memprof record --pod` finds a pod's container on the node
// (a runc container with its own libc in a kubelet-style cgroup, named by
// /var/log/pods), profiles it and labels the profile; a name in two
// namespaces or a wrong container name gets an error listing what is there.
func TestRecordPod(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	fsRoot := "memprof-recpod-" + kube.RandHex(8)
	t.Cleanup(func() { kube.RemoveCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	root := kube.Rootfs(t, testprog.Build(t, "agent_workload.c"))
	const leak, block = 8 << 20, 64 << 10
	shop := kube.Pod{Namespace: "shop", Name: "web-0", UID: kube.NewUID()}
	other := kube.Pod{Namespace: "staging", Name: "web-0", UID: kube.NewUID()}
	c := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: shop, Name: "app", Rootfs: root, Logs: logs,
		Args: []string{"/agent_workload", "leak", strconv.Itoa(leak), strconv.Itoa(block)}})
	kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: other, Name: "app", Rootfs: root, Logs: logs,
		Args: []string{"/agent_workload", "leak", strconv.Itoa(leak), strconv.Itoa(block)}})
	kube.WaitFor(t, 10*time.Second, "the container to start", func() bool { return strings.Contains(c.Output(), "waiting") })
	paths := []string{"--pod-logs", logs, "--cri-socket", "/nonexistent/memprof-test.sock"}

	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--pod", "web-0"}, []string{"web-0", "shop", "staging"}},
		{[]string{"--pod", "web-0", "--namespace", "shop", "--container", "nope"}, []string{"nope", "app"}},
		{[]string{"--pod", "web-1", "--namespace", "shop"}, []string{"web-1", "web-0"}},
	} {
		out, err := exec.Command(memprof, append(append([]string{"record"}, tc.args...), paths...)...).CombinedOutput()
		if err == nil {
			t.Errorf("record %v succeeded, want an error", tc.args)
		}
		for _, w := range tc.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("record %v: %q does not mention %q", tc.args, strings.TrimSpace(string(out)), w)
			}
		}
	}

	file := filepath.Join(t.TempDir(), "pod.pb.gz")
	rec := exec.Command(memprof, append([]string{"record", "--pod", "web-0", "--namespace", "shop", "--sample-rate", "1", "--duration", "4s", "-o", file}, paths...)...)
	var buf strings.Builder
	rec.Stdout, rec.Stderr = &buf, &buf
	if err := rec.Start(); err != nil {
		t.Fatal(err)
	}
	kube.WaitFor(t, 20*time.Second, "memprof to attach", func() bool { return strings.Contains(buf.String(), "probing ") })
	syscall.Kill(c.Pid, syscall.SIGUSR1)
	if err := rec.Wait(); err != nil {
		t.Fatalf("record --pod: %v\n%s", err, buf.String())
	}
	p, err := pprofout.ReadFile(file)
	if err != nil {
		t.Fatalf("%v\n%s", err, buf.String())
	}
	var leaked int64
	for _, s := range p.Sample {
		for k, want := range map[string]string{"namespace": "shop", "pod": "web-0", "container": "app", "pid": strconv.Itoa(c.Pid)} {
			if got := s.Label[k]; len(got) != 1 || got[0] != want {
				t.Fatalf("sample label %s = %v, want %q (labels %v)", k, got, want, s.Label)
			}
		}
		if fn := s.Location[0].Line[0].Function.Name; fn == "agent_leak_known" {
			leaked += s.Value[3]
		}
	}
	if leaked != leak {
		t.Errorf("agent_leak_known holds %d live bytes in the profile, want exactly %d (rate 1)\n%s", leaked, leak, buf.String())
	}
}

// TestProgressOnTerminal: on a terminal, record shows a live progress line
// (elapsed time, allocations seen, estimated live bytes). script(1) gives
// it a pseudo-terminal.
func TestProgressOnTerminal(t *testing.T) {
	testprog.RequireRoot(t)
	script, err := exec.LookPath("script")
	if err != nil {
		t.Fatalf("script(1) not found (Debian package bsdutils): %v", err)
	}
	memprof := buildMemprof(t)
	target := testprog.Start(t, testprog.Build(t, "rec_leaky.c"), nil, "--wait-start", "--wait-end")
	target.Expect(t, "READY")
	target.Send(t, "go")
	target.Expect(t, "DONE")
	file := filepath.Join(t.TempDir(), "tty.pb.gz")
	cmdline := fmt.Sprintf("%s record --pid %d --duration 2500ms -o %s", memprof, target.Pid(), file)
	out, err := exec.Command(script, "-q", "-e", "-c", cmdline, "/dev/null").CombinedOutput()
	if err != nil {
		t.Fatalf("memprof on a terminal: %v\n%s", err, out)
	}
	for _, want := range []string{"allocations seen:", "estimated live:", "targets: 1"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("no progress line with %q on a terminal:\n%q", want, out)
		}
	}
}
