package kube

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
)

// The labels the kubelet puts on CRI sandboxes and containers.
const (
	labelPodName       = "io.kubernetes.pod.name"
	labelPodNamespace  = "io.kubernetes.pod.namespace"
	labelPodUID        = "io.kubernetes.pod.uid"
	labelContainerName = "io.kubernetes.container.name"
)

// Containerd is a private containerd (Debian's package: cri plugin, runc
// shim) with its root, state, socket and runc state in a temporary
// directory, answering CRI.
type Containerd struct {
	Dir     string // its temporary directory (short: socket paths are limited to 108 bytes)
	Sock    string // its CRI / containerd socket
	FSRoot  string // test-unique cgroup root of its pods (see RemoveCgroupTree)
	Image   string // the image ImportImage imports and sandboxes and containers run
	Runtime runtimeapi.RuntimeServiceClient
	ctr     string
	logPath string
}

// StartContainerd starts a private containerd for the test and waits until
// it answers CRI. name tells tests apart in paths, cgroups and the image
// name. When the test ends it is stopped, its leftover shims killed, mounts
// under its directory detached, its cgroups and its directory removed.
func StartContainerd(t testing.TB, name string) *Containerd {
	t.Helper()
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
	tmp, err := os.MkdirTemp("", "mp"+name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(tmp); err != nil {
			t.Errorf("remove %s: %v", tmp, err)
		}
	})
	t.Cleanup(func() { unmountUnder(t, tmp) })
	tag := RandHex(8)
	c := &Containerd{
		Dir:     tmp,
		Sock:    filepath.Join(tmp, "containerd.sock"),
		FSRoot:  "memprof-" + name + "-" + tag,
		Image:   "memprof.test/" + name + ":" + tag,
		ctr:     ctr,
		logPath: filepath.Join(tmp, "containerd.log"),
	}
	t.Cleanup(func() { RemoveCgroupTree(t, c.FSRoot) })
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
`, filepath.Join(tmp, "root"), filepath.Join(tmp, "state"), c.Sock, c.Image,
		filepath.Join(tmp, "cni-bin"), filepath.Join(tmp, "cni-conf"), filepath.Join(tmp, "runc"))
	WriteFile(t, filepath.Join(tmp, "config.toml"), cfg)
	logf, err := os.Create(c.logPath)
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
		killShims(t, c.Sock)
	})
	conn, err := grpc.NewClient("unix://"+c.Sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	// closed before containerd stops, after the sandboxes' cleanups
	// (cleanups run last-in first-out)
	t.Cleanup(func() { conn.Close() })
	c.Runtime = runtimeapi.NewRuntimeServiceClient(conn)
	deadline := time.Now().Add(15 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = c.Runtime.Version(ctx, &runtimeapi.VersionRequest{})
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer CRI on %s: %v\n%s", c.Sock, err, c.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return c
}

// Log is containerd's output so far.
func (c *Containerd) Log() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// ImportImage imports c.Image, built from files (image path -> host path)
// with the given entrypoint (the sandboxes run it: a pause program), into
// containerd's k8s.io namespace. No registry is needed.
func (c *Containerd) ImportImage(t testing.TB, files map[string]string, entrypoint ...string) {
	t.Helper()
	imgTar := filepath.Join(c.Dir, "image.tar")
	WriteDockerArchive(t, imgTar, c.Image, files, entrypoint)
	if out, err := exec.Command(c.ctr, "--address", c.Sock, "--namespace", "k8s.io", "images", "import", imgTar).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
}

// Sandbox is a pod sandbox started over CRI.
type Sandbox struct {
	ID     string
	Pod    Pod
	LogDir string // the pod's log directory
	Config *runtimeapi.PodSandboxConfig
}

// RunPodSandbox starts the pod's sandbox as the kubelet would: host
// networking (no CNI here), the kubelet's labels, the given annotations, its
// log directory under logs and the cgroup parent
// <CgroupParent(c.FSRoot, "burstable")>. It is stopped and removed when the
// test ends.
//
// Each of opts may change the configuration before it is sent (host PID
// namespace, security context).
func (c *Containerd) RunPodSandbox(t testing.TB, p Pod, logs string, annotations map[string]string, opts ...func(*runtimeapi.PodSandboxConfig)) *Sandbox {
	t.Helper()
	sb := &Sandbox{Pod: p, LogDir: p.LogDir(logs)}
	if err := os.MkdirAll(sb.LogDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sb.Config = &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: p.Name, Namespace: p.Namespace, Uid: p.UID},
		LogDirectory: sb.LogDir,
		Labels:       map[string]string{labelPodName: p.Name, labelPodNamespace: p.Namespace, labelPodUID: p.UID},
		Annotations:  annotations,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: p.CgroupParent(c.FSRoot, "burstable"),
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE},
			},
		},
	}
	for _, o := range opts {
		o(sb.Config)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.Runtime.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: sb.Config})
	if err != nil {
		t.Fatalf("CRI RunPodSandbox: %v\n%s", err, c.Log())
	}
	sb.ID = resp.PodSandboxId
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := c.Runtime.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.ID}); err != nil {
			t.Errorf("CRI StopPodSandbox: %v", err)
		}
		if _, err := c.Runtime.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.ID}); err != nil {
			t.Errorf("CRI RemovePodSandbox: %v", err)
		}
	})
	return sb
}

// StartContainer creates and starts the container name of the sandbox
// running command in c.Image, with the kubelet's labels, its log at
// <LogDir>/<name>/0.log and the given mounts, and returns its id and the
// host pid of its process.
func (c *Containerd) StartContainer(t testing.TB, sb *Sandbox, name string, command []string, mounts ...*runtimeapi.Mount) (id string, pid int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(sb.LogDir, name), 0o755); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{labelContainerName: name}
	for k, v := range sb.Config.Labels {
		labels[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	created, err := c.Runtime.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: sb.ID,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: name},
			Image:    &runtimeapi.ImageSpec{Image: c.Image},
			Command:  command,
			LogPath:  name + "/0.log",
			Labels:   labels,
			Mounts:   mounts,
			Linux: &runtimeapi.LinuxContainerConfig{
				SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
					NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE},
				},
			},
		},
		SandboxConfig: sb.Config,
	})
	if err != nil {
		t.Fatalf("CRI CreateContainer: %v\n%s", err, c.Log())
	}
	id = created.ContainerId
	if _, err := c.Runtime.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("CRI StartContainer: %v\n%s", err, c.Log())
	}
	st, err := c.Runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		t.Fatalf("CRI ContainerStatus: %v", err)
	}
	var info struct{ Pid int }
	if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil || info.Pid <= 0 {
		t.Fatalf("CRI ContainerStatus verbose info has no pid: %v %q", err, st.Info["info"])
	}
	return id, info.Pid
}

// StartContainerConfig creates and starts a container of the sandbox from
// cfg as given (image, args, env, mounts, security context, resources), to
// which it adds the kubelet's labels and, when cfg has none, the log path
// <LogDir>/<name>/0.log. It returns the container's id and the host pid of
// its process. The sandbox's cleanup removes it.
func (c *Containerd) StartContainerConfig(t testing.TB, sb *Sandbox, cfg *runtimeapi.ContainerConfig) (id string, pid int) {
	t.Helper()
	name := cfg.GetMetadata().GetName()
	if cfg.LogPath == "" {
		cfg.LogPath = name + "/0.log"
	}
	if err := os.MkdirAll(filepath.Dir(filepath.Join(sb.LogDir, cfg.LogPath)), 0o755); err != nil {
		t.Fatal(err)
	}
	if cfg.Labels == nil {
		cfg.Labels = map[string]string{}
	}
	cfg.Labels[labelContainerName] = name
	for k, v := range sb.Config.Labels {
		cfg.Labels[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	created, err := c.Runtime.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: sb.ID, Config: cfg, SandboxConfig: sb.Config})
	if err != nil {
		t.Fatalf("CRI CreateContainer %s: %v\n%s", name, err, c.Log())
	}
	id = created.ContainerId
	if _, err := c.Runtime.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("CRI StartContainer %s: %v\n%s", name, err, c.Log())
	}
	st, err := c.Runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		t.Fatalf("CRI ContainerStatus: %v", err)
	}
	var info struct{ Pid int }
	if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil || info.Pid <= 0 {
		t.Fatalf("CRI ContainerStatus verbose info has no pid: %v %q", err, st.Info["info"])
	}
	return id, info.Pid
}

// ContainerLog is what the container name of the sandbox logged so far (the
// CRI log format: time, stream, tag and the line).
func (sb *Sandbox) ContainerLog(name string) string {
	b, _ := os.ReadFile(filepath.Join(sb.LogDir, name, "0.log"))
	return string(b)
}

// ImportArchive imports a docker-archive or OCI image tarball (as
// internal/image writes) into containerd's k8s.io namespace, where CRI
// finds it by the name it is tagged with.
func (c *Containerd) ImportArchive(t testing.TB, path string) {
	t.Helper()
	if out, err := exec.Command(c.ctr, "--address", c.Sock, "--namespace", "k8s.io", "images", "import", path).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", path, err, out)
	}
}

// WriteDockerArchive writes a docker-archive (docker save format) image
// named name with one uncompressed layer holding files (image path -> host
// path).
func WriteDockerArchive(t testing.TB, out, name string, files map[string]string, entrypoint []string) {
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

// unmountUnder detaches every mount below dir (containerd's rootfs and shm
// mounts, should a failed test leave any), deepest first.
func unmountUnder(t testing.TB, dir string) {
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
			mp := mountinfoUnescaper.Replace(fields[4])
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

// mountinfoUnescaper undoes the octal escapes the kernel writes in
// mountinfo paths (space, tab, newline, backslash).
var mountinfoUnescaper = strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)

// killShims kills the containerd-shim processes serving the containerd of
// sock (their command line names it), should a failed test leave any.
func killShims(t testing.TB, sock string) {
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
