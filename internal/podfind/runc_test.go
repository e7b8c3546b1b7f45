package podfind

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
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
	bin := testprog.Build(t, "k8s_sleeper.c")
	rootfs := kube.Rootfs(t, bin)

	p := kube.Pod{Namespace: "prod", Name: "api", UID: kube.NewUID()}
	uid := p.UID
	fsRoot := "memprof-runc-" + kube.RandHex(8)
	// runc creates the path in every v1 hierarchy (and the unified tree); it
	// removes only the leaf on delete, so remove the rest when the test ends.
	t.Cleanup(func() { kube.RemoveCgroupTree(t, fsRoot) })
	// with the kubelet's termination-log file bind-mounted at
	// /dev/termination-log
	rc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: p, Name: "api", Rootfs: rootfs, Args: []string{"/k8s_sleeper"}})
	id, cgPath, pid := rc.ID, rc.CgroupPath, rc.Pid
	kube.WaitFor(t, 10*time.Second, "the container to print ready", func() bool {
		return strings.Contains(rc.Output(), "ready")
	})

	logs := t.TempDir()
	p.WriteLog(t, logs, "init-migrate")
	p.WriteLog(t, logs, "api")

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
	if len(c.Pids) != 1 || c.Pids[0] != pid {
		t.Errorf("container pids %v, want the host pid from runc state [%d]", c.Pids, pid)
	}
	if want := filepath.Join("/sys/fs/cgroup/memory", cgPath); c.CgroupV1Memory != want {
		t.Errorf("v1 memory cgroup %q, want %q", c.CgroupV1Memory, want)
	}
	if want := filepath.Join("/sys/fs/cgroup/unified", cgPath); exists(want) && c.CgroupV2 != want {
		t.Errorf("v2 cgroup %q, want %q (runc created it)", c.CgroupV2, want)
	}
	if got := procmaps.Comm(pid); got != "k8s_sleeper" {
		t.Errorf("comm of host pid %d = %q, want k8s_sleeper", pid, got)
	}

	// the container maps its own libc: same path, different inode
	maps, err := procmaps.Read(pid)
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
		t.Fatalf("container process %d maps no executable libc.so.6", pid)
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
	f, err := procmaps.Open(pid, libc)
	if err != nil {
		t.Fatalf("procmaps.Open container libc: %v", err)
	}
	defer f.Close()
	if ino, _ := procmaps.InodeOf(f); ino != libc.Inode {
		t.Errorf("procmaps.Open gave inode %d, container maps %d", ino, libc.Inode)
	}
	want := filepath.Join("/proc", strconv.Itoa(pid), "root", hostLibc)
	if got := procmaps.HostPath(pid, libc.Path); got != want {
		t.Errorf("HostPath = %q, want %q", got, want)
	}
}
