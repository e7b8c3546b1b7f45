package podfind

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/memprof/memprof/internal/testprog"
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
	containerd, err := exec.LookPath("containerd")
	if err != nil {
		t.Fatalf("containerd not found: install the Debian package containerd (apt-get install containerd runc): %v", err)
	}
	ctr, err := exec.LookPath("ctr")
	if err != nil {
		t.Fatalf("ctr not found (it ships in the Debian package containerd): %v", err)
	}
	for _, b := range []string{"containerd-shim-runc-v2", "runc"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Fatalf("%s not found: install the Debian packages containerd and runc: %v", b, err)
		}
	}
	pauseBin := testprog.Build(t, "k8s_pause.c", "-static")
	sleeperBin := testprog.Build(t, "k8s_sleeper.c")

	// Short paths: unix socket paths are limited to 108 bytes.
	tmp, err := os.MkdirTemp("", "mpctrd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(tmp); err != nil {
			t.Errorf("remove %s: %v", tmp, err)
		}
	})
	t.Cleanup(func() { unmountUnder(t, tmp) })
	tag := randHex(8)
	fsRoot := "memprof-ctrd-" + tag
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })

	sock := filepath.Join(tmp, "containerd.sock")
	image := "memprof.test/k8s:" + tag
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # the test machines' root lacks CAP_SYS_RESOURCE, so it cannot lower
  # oom_score_adj to the kubelet's -998 for sandboxes
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  # runc's state under the temp dir, not the host's /run/containerd/runc
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = %q
`, filepath.Join(tmp, "root"), filepath.Join(tmp, "state"), sock, image,
		filepath.Join(tmp, "cni-bin"), filepath.Join(tmp, "cni-conf"), filepath.Join(tmp, "runc"))
	writeFile(t, filepath.Join(tmp, "config.toml"), cfg)
	logf, err := os.Create(filepath.Join(tmp, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	daemon := exec.Command(containerd, "--config", filepath.Join(tmp, "config.toml"))
	daemon.Stdout, daemon.Stderr = logf, logf
	if err := daemon.Start(); err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	t.Cleanup(func() {
		daemon.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { daemon.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			daemon.Process.Kill()
			<-done
		}
		killShims(t, sock)
	})
	containerdLog := func() string { b, _ := os.ReadFile(logf.Name()); return string(b) }

	// The CRI client Discover uses: containerd answers with empty lists.
	var inv *CRIInventory
	deadline := time.Now().Add(15 * time.Second)
	for {
		inv, err = QueryCRI(context.Background(), sock)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer CRI on %s: %v\n%s", sock, err, containerdLog())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if inv.RuntimeName != "containerd" || inv.RuntimeAPIVersion != "v1" || len(inv.Containers) != 0 || len(inv.Sandboxes) != 0 {
		t.Fatalf("fresh containerd: %+v, want runtime containerd, API v1, no sandboxes or containers", inv)
	}
	t.Logf("containerd %s answers CRI %s", inv.RuntimeVersion, inv.RuntimeAPIVersion)

	// A local image: static pause + k8s_sleeper with its own libc.
	files := map[string]string{"/pause": pauseBin, "/k8s_sleeper": sleeperBin}
	out, err := exec.Command("ldd", sleeperBin).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd %s: %v\n%s", sleeperBin, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				files[f] = f
			}
		}
	}
	imgTar := filepath.Join(tmp, "image.tar")
	writeDockerArchive(t, imgTar, image, files, []string{"/pause"})
	if out, err := exec.Command(ctr, "--address", sock, "--namespace", "k8s.io", "images", "import", imgTar).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	// closed after the sandbox cleanup below (cleanups run last-in first-out)
	t.Cleanup(func() { conn.Close() })
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	uid := newUID()
	ns, podName := "shop", "cart"
	logs := filepath.Join(tmp, "pods")
	podLogDir := filepath.Join(logs, ns+"_"+podName+"_"+uid)
	if err := os.MkdirAll(filepath.Join(podLogDir, "app"), 0o755); err != nil {
		t.Fatal(err)
	}
	// An init container's log directory next to app's: the log tree alone
	// cannot tell which container is running.
	if err := os.MkdirAll(filepath.Join(podLogDir, "migrate"), 0o755); err != nil {
		t.Fatal(err)
	}
	termLog := filepath.Join(tmp, "kubelet", "pods", uid, "containers", "app", randHex(8))
	writeFile(t, termLog, "")
	podLabels := map[string]string{LabelPodName: podName, LabelPodNamespace: ns, LabelPodUID: uid}
	sbCfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: podName, Namespace: ns, Uid: uid},
		LogDirectory: podLogDir,
		Labels:       podLabels,
		Annotations:  map[string]string{"memprof.io/profile": "true"},
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: "/" + fsRoot + "/kubepods/burstable/pod" + uid,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE},
			},
		},
	}
	sb, err := rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: sbCfg})
	if err != nil {
		t.Fatalf("CRI RunPodSandbox: %v\n%s", err, containerdLog())
	}
	sbID := sb.PodSandboxId
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := rt.StopPodSandbox(c, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sbID}); err != nil {
			t.Errorf("CRI StopPodSandbox: %v", err)
		}
		if _, err := rt.RemovePodSandbox(c, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sbID}); err != nil {
			t.Errorf("CRI RemovePodSandbox: %v", err)
		}
	})
	ctLabels := map[string]string{LabelContainerName: "app"}
	for k, v := range podLabels {
		ctLabels[k] = v
	}
	created, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: sbID,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: "app"},
			Image:    &runtimeapi.ImageSpec{Image: image},
			Command:  []string{"/k8s_sleeper"},
			LogPath:  "app/0.log",
			Labels:   ctLabels,
			// the kubelet's termination-log mount
			Mounts: []*runtimeapi.Mount{{ContainerPath: "/dev/termination-log", HostPath: termLog}},
			Linux: &runtimeapi.LinuxContainerConfig{
				SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
					NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE},
				},
			},
		},
		SandboxConfig: sbCfg,
	})
	if err != nil {
		t.Fatalf("CRI CreateContainer: %v\n%s", err, containerdLog())
	}
	id := created.ContainerId
	if _, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("CRI StartContainer: %v\n%s", err, containerdLog())
	}
	st, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		t.Fatalf("CRI ContainerStatus: %v", err)
	}
	var info struct{ Pid int }
	if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil || info.Pid <= 0 {
		t.Fatalf("CRI ContainerStatus verbose info has no pid: %v %q", err, st.Info["info"])
	}
	waitFor(t, "the container to log ready", func() bool {
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
	if len(c.Pids) != 1 || c.Pids[0] != info.Pid || comm("/proc", info.Pid) != "k8s_sleeper" {
		t.Errorf("pids %v, want [%d] (k8s_sleeper, from CRI ContainerStatus)", c.Pids, info.Pid)
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

// writeDockerArchive writes a docker-archive (docker save format) image with
// one uncompressed layer holding files (image path -> host path).
func writeDockerArchive(t *testing.T, out, name string, files map[string]string, entrypoint []string) {
	t.Helper()
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	dirs := map[string]bool{}
	var paths []string
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		rel := strings.TrimPrefix(p, "/")
		for d := filepath.Dir(rel); d != "."; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var dl []string
	for d := range dirs {
		dl = append(dl, d)
	}
	sort.Strings(dl)
	for _, d := range dl {
		tw.WriteHeader(&tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for _, p := range paths {
		b, err := os.ReadFile(files[p])
		if err != nil {
			t.Fatalf("read %s for the image: %v", files[p], err)
		}
		tw.WriteHeader(&tar.Header{Name: strings.TrimPrefix(p, "/"), Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(b))})
		tw.Write(b)
	}
	tw.Close()
	sum := sha256.Sum256(layer.Bytes())
	diffID := "sha256:" + hex.EncodeToString(sum[:])
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": entrypoint},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
	})
	csum := sha256.Sum256(config)
	configName := hex.EncodeToString(csum[:]) + ".json"
	manifest, _ := json.Marshal([]map[string]any{{
		"Config": configName, "RepoTags": []string{name}, "Layers": []string{"layer.tar"},
	}})

	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{{"layer.tar", layer.Bytes()}, {configName, config}, {"manifest.json", manifest}} {
		w.WriteHeader(&tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(e.data))})
		w.Write(e.data)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// unmountUnder detaches every mount below dir (containerd's rootfs and shm
// mounts, should a failed test leave any), deepest first.
func unmountUnder(t *testing.T, dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			mp := unescapeMountinfo(fields[4])
			if strings.HasPrefix(mp, dir+"/") {
				mps = append(mps, mp)
			}
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mps)))
	for _, mp := range mps {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			t.Logf("unmount %s: %v", mp, err)
		}
	}
}

// killShims kills the containerd-shim processes serving our containerd (their
// command line names its socket), should a failed test leave any.
func killShims(t *testing.T, sock string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := string(bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		if strings.Contains(cmd, "containerd-shim") && strings.Contains(cmd, sock) {
			t.Logf("killing leftover shim %d: %s", pid, cmd)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
