package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// mountTmpfs mounts a tmpfs with opts on a new directory for the test.
func mountTmpfs(t *testing.T, opts string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs -o %s: %v\n%s", opts, err, out)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// TestRecordOutputChecked: an output that cannot be written is refused
// before anything is recorded; bad --sample-rate and --duration values too.
func TestRecordOutputChecked(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	self := strconv.Itoa(os.Getpid())
	ro := mountTmpfs(t, "ro,size=1m")
	outDir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"record", "--pid", self, "-o", "/nonexistent-memprof-dir/heap.pb.gz"}, "directory /nonexistent-memprof-dir does not exist"},
		{[]string{"record", "--pid", self, "-o", filepath.Join(ro, "heap.pb.gz")}, "cannot write in " + ro},
		{[]string{"record", "--pid", self, "-o", outDir}, "is a directory"},
		{[]string{"record", "--pid", self, "--sample-rate", "2147483648"}, "above the maximum of 1073741824 bytes"},
		{[]string{"record", "--pid", self, "--duration", "-5s"}, "--duration must be positive"},
		{[]string{"record", "--pid", self, "--duration", "0s"}, "--duration must be positive"},
		{[]string{"record", "--rss", "--pid", self, "-o", "/nonexistent-memprof-dir/rss.pb.gz"}, "directory /nonexistent-memprof-dir does not exist"},
		{[]string{"record", "--rss", "--pid", self, "-o", filepath.Join(ro, "rss.pb.gz")}, "cannot write in " + ro},
		{[]string{"record", "--rss", "--pid", self, "--sample-rate", "2147483648"}, "above the maximum of 1073741824 bytes"},
		{[]string{"record", "--rss", "--pid", self, "--duration", "0s"}, "--duration must be positive"},
	} {
		start := time.Now()
		out, err := exec.Command(memprof, tc.args...).CombinedOutput()
		if err == nil {
			t.Errorf("memprof %v succeeded, want an error", tc.args)
			continue
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("memprof %v: %q, want it to say %q", tc.args, strings.TrimSpace(string(out)), tc.want)
		}
		if strings.Contains(string(out), "recording ") {
			t.Errorf("memprof %v started recording before refusing: %q", tc.args, out)
		}
		t.Logf("%v: refused in %v: %s", tc.args[1:], time.Since(start).Round(time.Millisecond), strings.TrimSpace(string(out)))
	}
}

// TestRecordFullDiskFallback: the output's file system fills up during the
// recording; the profile is saved in $TMPDIR instead, memprof says where,
// and it holds the recording.
func TestRecordFullDiskFallback(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	bin := testprog.Build(t, "exit_soon.cc")
	full := mountTmpfs(t, "size=64k")
	// Fill it: the check before recording (creating an empty file) passes,
	// writing the profile does not.
	filler, _ := os.Create(filepath.Join(full, "filler"))
	filler.Write(make([]byte, 1<<20))
	filler.Close()
	tmp := t.TempDir()
	rec := exec.Command(memprof, "record", "--sample-rate", "1", "-o", filepath.Join(full, "heap.pb.gz"), "--", bin)
	rec.Env = append(os.Environ(), "TMPDIR="+tmp)
	rec.Stdin = strings.NewReader("go\n")
	out, err := rec.CombinedOutput()
	if err != nil {
		t.Fatalf("memprof record: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`the profile was saved to (\S+) instead`).FindStringSubmatch(string(out))
	if m == nil || filepath.Dir(m[1]) != tmp {
		t.Fatalf("output does not say the profile was saved in %s:\n%s", tmp, out)
	}
	p, err := pprofout.ReadFile(m[1])
	if err != nil {
		t.Fatalf("fallback profile: %v", err)
	}
	rows, _ := pprofout.Top(p, "inuse_space", 5)
	got := map[string]int64{}
	for _, r := range rows {
		got[strings.Fields(r.Frames[0])[0]] = r.Value
	}
	if got["keep_malloc"] != 4_194_304 || got["keep_new"] != 4_194_304 {
		t.Errorf("fallback profile top stacks %v, want keep_malloc and keep_new with 4194304 bytes each", got)
	}
	if !strings.Contains(string(out), "view it with: go tool pprof -http=: "+m[1]) {
		t.Errorf("the summary does not point at the fallback file:\n%s", out)
	}
}

// TestRecordNoVerdictOnOverflow: more live sampled blocks than the live map
// holds (262,144) — the live size is undercounted, so the fragmentation
// verdict is withheld (figures only, with the reason) and the loss shown.
func TestRecordNoVerdictOnOverflow(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	bin := testprog.Build(t, "agent_workload.c")
	const blocks = 300_000
	target := exec.Command(bin, "leak", strconv.Itoa(16*blocks), "16")
	var tout strings.Builder
	target.Stdout = &tout
	if err := target.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { target.Process.Kill(); target.Wait() })
	for !strings.Contains(tout.String(), "waiting") {
		time.Sleep(10 * time.Millisecond)
	}
	rec := exec.Command(memprof, "record", "--sample-rate", "1", "--duration", "6s", "--pid", strconv.Itoa(target.Process.Pid),
		"-o", filepath.Join(t.TempDir(), "heap.pb.gz"))
	var buf strings.Builder
	rec.Stdout, rec.Stderr = &buf, &buf
	if err := rec.Start(); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(buf.String(), "probing ") {
		time.Sleep(20 * time.Millisecond)
	}
	target.Process.Signal(syscall.SIGUSR1)
	if err := rec.Wait(); err != nil {
		t.Fatalf("memprof record: %v\n%s", err, buf.String())
	}
	out := buf.String()
	if !strings.Contains(tout.String(), "leaked") {
		t.Fatalf("the target did not finish its leak within the recording: %q", tout.String())
	}
	var fragLine string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, fmt.Sprintf("fragmentation pid %d", target.Process.Pid)) {
			fragLine = l
		}
	}
	t.Logf("%s", fragLine)
	for _, want := range []string{"live_map_full=", "no verdict: the live size may be undercounted", "the live-block map was full", "figures only: RSS"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "advice:") || strings.Contains(fragLine, "healthy") || strings.Contains(fragLine, "high fragmentation") {
		t.Errorf("a verdict was given on an undercounted live size:\n%s", out)
	}
}
