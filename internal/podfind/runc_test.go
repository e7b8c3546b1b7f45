package podfind

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
)

const hostLibc = "/lib/x86_64-linux-gnu/libc.so.6"

// TestRuncContainer runs a real OCI container with runc in a kubelet-style
// cgroup (cgroupfs driver, Burstable) with its own rootfs and its own copy of
// libc, and the kubelet's termination-log bind mount. Discover must find it
// with its host pid and name it from that mount (the pod log directory has two
// container directories, so the log tree alone cannot tell which is running),
// and procmaps must see the container's libc, a different inode than the host's.
func TestRuncContainer(t *testing.T) {
	testprog.RequireRoot(t)
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc not found: install the Debian package runc (apt-get install runc): %v", err)
	}
	bin := testprog.Build(t, "k8s_sleeper.c")

	tmp := t.TempDir()
	bundle := filepath.Join(tmp, "bundle")
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"proc", "dev", "sys", "tmp"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, bin, filepath.Join(rootfs, "k8s_sleeper"), 0o755)
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd %s: %v\n%s", bin, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				copyFile(t, f, filepath.Join(rootfs, f), 0o755)
			}
		}
	}

	uid, id := newUID(), newID()
	fsRoot := "memprof-runc-" + randHex(8)
	cgPath := "/" + fsRoot + "/kubepods/burstable/pod" + uid + "/" + id
	// runc creates the path in every v1 hierarchy (and the unified tree); it
	// removes only the leaf on delete, so remove the rest when the test ends.
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })

	// the kubelet's termination-log file, bind-mounted at /dev/termination-log
	kubeletRoot := filepath.Join(tmp, "var", "lib", "kubelet")
	termLog := filepath.Join(kubeletRoot, "pods", uid, "containers", "api", randHex(8))
	writeFile(t, termLog, "")

	runSpec := exec.Command(runc, "spec", "-b", bundle)
	if out, err := runSpec.CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v\n%s", err, out)
	}
	cfgPath := filepath.Join(bundle, "config.json")
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatalf("parse runc spec: %v", err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/k8s_sleeper"}
	spec["root"] = map[string]any{"path": rootfs, "readonly": true}
	spec["mounts"] = append(spec["mounts"].([]any), map[string]any{
		"destination": "/dev/termination-log", "type": "bind", "source": termLog,
		"options": []string{"rbind", "rw"},
	})
	spec["linux"].(map[string]any)["cgroupsPath"] = cgPath
	raw, _ = json.MarshalIndent(spec, "", "  ")
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}

	state := filepath.Join(tmp, "runc-state")
	rc := func(args ...string) *exec.Cmd {
		return exec.Command(runc, append([]string{"--root", state}, args...)...)
	}
	t.Cleanup(func() {
		if out, err := rc("delete", "-f", id).CombinedOutput(); err != nil {
			t.Errorf("runc delete -f %s: %v\n%s", id, err, out)
		}
	})
	stdout, err := os.Create(filepath.Join(tmp, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	run := rc("run", "-d", "-b", bundle, id)
	run.Stdout, run.Stderr = stdout, stdout
	if err := run.Run(); err != nil {
		b, _ := os.ReadFile(stdout.Name())
		t.Fatalf("runc run -d: %v\n%s", err, b)
	}
	out, err = rc("state", id).Output()
	if err != nil {
		t.Fatalf("runc state %s: %v", id, err)
	}
	var st struct {
		Pid    int
		Status string
	}
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v: %s", id, err, out)
	}
	waitFor(t, "the container to print ready", func() bool {
		b, _ := os.ReadFile(stdout.Name())
		return strings.Contains(string(b), "ready")
	})

	logs := t.TempDir()
	writeFile(t, filepath.Join(logs, "prod_api_"+uid, "init-migrate", "0.log"), "")
	writeFile(t, filepath.Join(logs, "prod_api_"+uid, "api", "0.log"), "")

	all, err := Discover(context.Background(), Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs})
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	c, ok := byID(all)[id]
	if !ok {
		for _, c := range all {
			t.Logf("found %s", fmtContainer(c))
		}
		t.Fatalf("Discover did not find runc container %s in cgroup %s", id, cgPath)
	}
	t.Logf("found %s", fmtContainer(c))
	if c.Namespace != "prod" || c.Pod != "api" || c.PodUID != uid || c.Name != "api" || c.QoS != QoSBurstable || c.Source != SourcePodLogs {
		t.Errorf("container metadata %s; want prod/api container api Burstable from pod-logs", fmtContainer(c))
	}
	if len(c.Pids) != 1 || c.Pids[0] != st.Pid {
		t.Errorf("container pids %v, want the host pid from runc state [%d]", c.Pids, st.Pid)
	}
	if want := filepath.Join("/sys/fs/cgroup/memory", cgPath); c.CgroupV1Memory != want {
		t.Errorf("v1 memory cgroup %q, want %q", c.CgroupV1Memory, want)
	}
	if want := filepath.Join("/sys/fs/cgroup/unified", cgPath); exists(want) && c.CgroupV2 != want {
		t.Errorf("v2 cgroup %q, want %q (runc created it)", c.CgroupV2, want)
	}
	if got := procmaps.Comm(st.Pid); got != "k8s_sleeper" {
		t.Errorf("comm of host pid %d = %q, want k8s_sleeper", st.Pid, got)
	}

	// the container maps its own libc: same path, different inode
	maps, err := procmaps.Read(st.Pid)
	if err != nil {
		t.Fatal(err)
	}
	var libc *procmaps.Mapping
	for i := range maps {
		if maps[i].Exec() && strings.HasSuffix(maps[i].Path, "/libc.so.6") {
			libc = &maps[i]
		}
	}
	if libc == nil {
		t.Fatalf("container process %d maps no executable libc.so.6", st.Pid)
	}
	var hostSt syscall.Stat_t
	if err := syscall.Stat(hostLibc, &hostSt); err != nil {
		t.Fatalf("stat host libc %s: %v", hostLibc, err)
	}
	if libc.Path != hostLibc {
		t.Errorf("container maps libc at %q, want the same path as the host, %q", libc.Path, hostLibc)
	}
	if libc.Inode == hostSt.Ino {
		t.Errorf("container libc inode %d equals the host's %s inode: the container is not using its own copy", libc.Inode, hostLibc)
	}
	f, err := procmaps.Open(st.Pid, libc)
	if err != nil {
		t.Fatalf("procmaps.Open container libc: %v", err)
	}
	defer f.Close()
	if ino, _ := procmaps.InodeOf(f); ino != libc.Inode {
		t.Errorf("procmaps.Open gave inode %d, container maps %d", ino, libc.Inode)
	}
	want := filepath.Join("/proc", strconv.Itoa(st.Pid), "root", hostLibc)
	if got := procmaps.HostPath(st.Pid, libc.Path); got != want {
		t.Errorf("HostPath = %q, want %q", got, want)
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatalf("read %s for the container rootfs: %v", src, err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// removeCgroupTree removes /sys/fs/cgroup/<hierarchy>/<top> and everything
// below it, deepest first, in every mounted hierarchy. top is unique to one
// test run, so any process still in it was started by that test (a container
// whose runtime failed to stop it): those are killed first, by pid.
func removeCgroupTree(t *testing.T, top string) {
	hs, _ := os.ReadDir("/sys/fs/cgroup")
	killed := false
	for _, h := range hs {
		root := filepath.Join("/sys/fs/cgroup", h.Name(), top)
		for _, pid := range readPidsRecursive(root) {
			t.Logf("killing leftover process %d (%s) in test cgroup %s", pid, comm("/proc", pid), root)
			syscall.Kill(pid, syscall.SIGKILL)
			killed = true
		}
	}
	if killed {
		time.Sleep(200 * time.Millisecond)
	}
	for _, h := range hs {
		root := filepath.Join("/sys/fs/cgroup", h.Name(), top)
		if !exists(root) {
			continue
		}
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if !rmCgroup(t, dirs[i]) {
				break // its parents cannot go either
			}
		}
	}
}
