package podfind

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// TestContainerdCRI starts a private containerd (Debian's package: cri plugin,
// runc shim) on a socket in a temp dir, imports a locally built image (a
// static pause for the sandbox, k8s_sleeper and its own libc for the
// container; no registry is reachable), and drives it over CRI as the kubelet
// would: RunPodSandbox with host networking (no CNI here) under a kubelet-style
// cgroup parent, CreateContainer with the kubelet's labels, StartContainer.
// Discover must then name the container from CRI, carry the pod's annotations,
// leave the sandbox out, and report the container's host pid.
func TestContainerdCRI(t *testing.T) {
	testprog.RequireRoot(t)
	pauseBin := testprog.Build(t, "k8s_pause.c", "-static")
	sleeperBin := testprog.Build(t, "k8s_sleeper.c")

	cd := kube.StartContainerd(t, "ctrd")
	tmp, sock, fsRoot := cd.Dir, cd.Sock, cd.FSRoot

	// The CRI client Discover uses: containerd answers with empty lists.
	inv, err := QueryCRI(context.Background(), sock)
	if err != nil {
		t.Fatalf("QueryCRI %s: %v\n%s", sock, err, cd.Log())
	}
	if inv.RuntimeName != "containerd" || inv.RuntimeAPIVersion != "v1" || len(inv.Containers) != 0 || len(inv.Sandboxes) != 0 {
		t.Fatalf("fresh containerd: %+v, want runtime containerd, API v1, no sandboxes or containers", inv)
	}
	t.Logf("containerd %s answers CRI %s", inv.RuntimeVersion, inv.RuntimeAPIVersion)

	// A local image: static pause + k8s_sleeper with its own libc.
	files := map[string]string{"/pause": pauseBin, "/k8s_sleeper": sleeperBin}
	for _, lib := range kube.Libs(t, sleeperBin) {
		files[lib] = lib
	}
	cd.ImportImage(t, files, "/pause")

	p := kube.Pod{Namespace: "shop", Name: "cart", UID: kube.NewUID()}
	uid, ns, podName := p.UID, p.Namespace, p.Name
	logs := filepath.Join(tmp, "pods")
	podLogDir := p.LogDir(logs)
	// An init container's log directory next to app's: the log tree alone
	// cannot tell which container is running.
	if err := os.MkdirAll(filepath.Join(podLogDir, "migrate"), 0o755); err != nil {
		t.Fatal(err)
	}
	termLog := filepath.Join(tmp, "kubelet", "pods", uid, "containers", "app", kube.RandHex(8))
	kube.WriteFile(t, termLog, "")
	sb := cd.RunPodSandbox(t, p, logs, map[string]string{"memprof.io/profile": "true"})
	sbID := sb.ID
	// with the kubelet's termination-log mount
	id, pid := cd.StartContainer(t, sb, "app", []string{"/k8s_sleeper"},
		&runtimeapi.Mount{ContainerPath: "/dev/termination-log", HostPath: termLog})
	kube.WaitFor(t, 10*time.Second, "the container to log ready", func() bool {
		b, _ := os.ReadFile(filepath.Join(podLogDir, "app", "0.log"))
		return strings.Contains(string(b), "ready")
	})

	all, err := Discover(context.Background(), Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs, CRISockets: []string{sock}})
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	var mine []Container
	for _, c := range all {
		if c.PodUID == uid {
			mine = append(mine, c)
			t.Logf("found %s annotations=%v", fmtContainer(c), c.Annotations)
		}
	}
	if len(mine) != 1 {
		t.Fatalf("Discover found %d containers of pod %s, want 1 (the sandbox %s must be left out)", len(mine), uid, sbID)
	}
	c := mine[0]
	if c.ID != id || c.Namespace != ns || c.Pod != podName || c.Name != "app" || c.Source != SourceCRI || c.Runtime != "containerd" || c.QoS != QoSBurstable {
		t.Errorf("got %s; want %s/%s container app id %.12s runtime containerd from cri", fmtContainer(c), ns, podName, id)
	}
	if c.Annotations["memprof.io/profile"] != "true" {
		t.Errorf("pod annotations %v, want memprof.io/profile=true from the sandbox", c.Annotations)
	}
	if len(c.Pids) != 1 || c.Pids[0] != pid || comm("/proc", pid) != "k8s_sleeper" {
		t.Errorf("pids %v, want [%d] (k8s_sleeper, from CRI ContainerStatus)", c.Pids, pid)
	}
	if want := "/sys/fs/cgroup/memory/" + fsRoot + "/kubepods/burstable/pod" + uid + "/" + id; c.CgroupV1Memory != want {
		t.Errorf("v1 memory cgroup %q, want %q", c.CgroupV1Memory, want)
	}
	sel, err := Select(all, podName, "", "app")
	if err != nil || len(sel) != 1 || sel[0].ID != id {
		t.Errorf("Select(%s, app) = %v, %v", podName, sel, err)
	}

	// Without the CRI socket, as an agent in a container whose host /proc is
	// mounted elsewhere: names come from the pod log tree and the
	// termination-log mount, the sandbox is recognised by its pause process.
	hostProc := filepath.Join(tmp, "hostproc")
	if err := os.MkdirAll(hostProc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("proc", hostProc, "proc", 0, ""); err != nil {
		t.Fatalf("mount proc at %s: %v", hostProc, err)
	}
	all, err = Discover(context.Background(), Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: hostProc, PodLogs: logs})
	if err != nil {
		t.Fatalf("Discover without CRI: %v", err)
	}
	mine = mine[:0]
	for _, c := range all {
		if c.PodUID == uid {
			mine = append(mine, c)
		}
	}
	if len(mine) != 1 {
		t.Fatalf("Discover without CRI found %d containers of pod %s, want 1 (the pause sandbox left out): %v", len(mine), uid, mine)
	}
	c = mine[0]
	if c.ID != id || c.Namespace != ns || c.Pod != podName || c.Name != "app" || c.Source != SourcePodLogs || c.Annotations != nil {
		t.Errorf("without CRI: got %s annotations %v; want %s/%s container app from pod-logs, no annotations", fmtContainer(c), c.Annotations, ns, podName)
	}
}
