package agent

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

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
)

// TestAgentAnnotationCRI drives a private containerd over CRI as the kubelet
// would (the pattern of internal/podfind's containerd test): two pods in one
// namespace, only one annotated memprof.io/profile: "true". The agent, with
// no --namespace, must profile the annotated pod's container (named from
// CRI) and leave the other alone.
func TestAgentAnnotationCRI(t *testing.T) {
	testprog.RequireRoot(t)
	containerd, err := exec.LookPath("containerd")
	if err != nil {
		t.Fatalf("containerd not found: install the Debian packages containerd and runc: %v", err)
	}
	ctrBin, err := exec.LookPath("ctr")
	if err != nil {
		t.Fatalf("ctr not found (Debian package containerd): %v", err)
	}
	pauseBin := testprog.Build(t, "k8s_pause.c", "-static")
	workBin := testprog.Build(t, "agent_workload.c")

	tmp, err := os.MkdirTemp("", "mpagent")
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
	fsRoot := "memprof-agentcri-" + tag
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	sock := filepath.Join(tmp, "containerd.sock")
	image := "memprof.test/agent:" + tag
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
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
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err = podfind.QueryCRI(context.Background(), sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer CRI on %s: %v\n%s", sock, err, containerdLog())
		}
		time.Sleep(100 * time.Millisecond)
	}

	files := map[string]string{"/pause": pauseBin, "/agent_workload": workBin}
	out, err := exec.Command("ldd", workBin).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd: %v\n%s", err, out)
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
	if out, err := exec.Command(ctrBin, "--address", sock, "--namespace", "k8s.io", "images", "import", imgTar).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logs := filepath.Join(tmp, "pods")
	ns := "shop"

	// runPod starts a sandbox and one container "app" running the leaker.
	runPod := func(name string, annotations map[string]string) (pid int) {
		uid := newUID()
		podLogDir := filepath.Join(logs, ns+"_"+name+"_"+uid)
		if err := os.MkdirAll(filepath.Join(podLogDir, "app"), 0o755); err != nil {
			t.Fatal(err)
		}
		podLabels := map[string]string{podfind.LabelPodName: name, podfind.LabelPodNamespace: ns, podfind.LabelPodUID: uid}
		sbCfg := &runtimeapi.PodSandboxConfig{
			Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: ns, Uid: uid},
			LogDirectory: podLogDir,
			Labels:       podLabels,
			Annotations:  annotations,
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
		ctLabels := map[string]string{podfind.LabelContainerName: "app"}
		for k, v := range podLabels {
			ctLabels[k] = v
		}
		created, err := rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
			PodSandboxId: sbID,
			Config: &runtimeapi.ContainerConfig{
				Metadata: &runtimeapi.ContainerMetadata{Name: "app"},
				Image:    &runtimeapi.ImageSpec{Image: image},
				Command:  []string{"/agent_workload", "leak", strconv.Itoa(8 << 20), strconv.Itoa(64 << 10)},
				LogPath:  "app/0.log",
				Labels:   ctLabels,
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
		if _, err := rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: created.ContainerId}); err != nil {
			t.Fatalf("CRI StartContainer: %v\n%s", err, containerdLog())
		}
		st, err := rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: created.ContainerId, Verbose: true})
		if err != nil {
			t.Fatalf("CRI ContainerStatus: %v", err)
		}
		var info struct{ Pid int }
		if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil || info.Pid <= 0 {
			t.Fatalf("CRI ContainerStatus has no pid: %v %q", err, st.Info["info"])
		}
		return info.Pid
	}

	a, _, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs, CRISockets: []string{sock}},
		SampleRate:       64 << 10,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
	})
	wanted := runPod("annotated", map[string]string{AnnotationProfile: "true"})
	plain := runPod("plain", nil)
	waitFor(t, 20*time.Second, "the agent to profile the annotated pod", func() bool {
		c := findContainer(a, ns, "annotated")
		return c != nil && c.Processes >= 1
	})
	syscall.Kill(wanted, syscall.SIGUSR1)
	syscall.Kill(plain, syscall.SIGUSR1)
	waitFor(t, 10*time.Second, "the annotated pod's live heap", func() bool {
		c := findContainer(a, ns, "annotated")
		return c != nil && c.LiveHeap > 4<<20
	})
	time.Sleep(time.Second)
	c := findContainer(a, ns, "annotated")
	t.Logf("annotated pod: container %q pids %v, live heap %.1f MiB (8 MiB leaked)", c.Container, c.Pids, c.LiveHeap/(1<<20))
	if c.Container != "app" || !within(c.LiveHeap, 8<<20, 0.25) {
		t.Errorf("annotated pod: container %q live heap %.0f, want app with 8 MiB ±25%%", c.Container, c.LiveHeap)
	}
	if p := findContainer(a, ns, "plain"); p != nil {
		t.Errorf("the pod without the annotation is profiled: %+v", p)
	}
	if _, ok := a.s.Targets()[plain]; ok {
		t.Errorf("probes attached to the unannotated pod's process %d", plain)
	}
}

// writeDockerArchive, unmountUnder and killShims follow internal/podfind's
// containerd test.

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
		for d := filepath.Dir(strings.TrimPrefix(p, "/")); d != "."; d = filepath.Dir(d) {
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
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": entrypoint},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(sum[:])}},
	})
	csum := sha256.Sum256(config)
	configName := hex.EncodeToString(csum[:]) + ".json"
	manifest, _ := json.Marshal([]map[string]any{{"Config": configName, "RepoTags": []string{name}, "Layers": []string{"layer.tar"}}})
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
			mp := strings.ReplaceAll(fields[4], `\040`, " ")
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
