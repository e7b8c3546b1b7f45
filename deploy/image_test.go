package deploy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/image"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// capNames are the Linux capabilities by number (linux/capability.h,
// CAP_CHOWN = 0 ... CAP_CHECKPOINT_RESTORE = 40), as Kubernetes names them
// (without CAP_).
var capNames = []string{
	"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
	"SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
	"IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
	"SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
	"LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
	"WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
}

func capBit(t *testing.T, name string) uint64 {
	i := slices.Index(capNames, strings.TrimPrefix(strings.ToUpper(name), "CAP_"))
	if i < 0 {
		t.Fatalf("unknown capability %q in the DaemonSet", name)
	}
	return 1 << i
}

func capList(mask uint64) []string {
	var out []string
	for i, n := range capNames {
		if mask&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return out
}

// procStatus reads the fields of /proc/PID/status (nil: no such process).
func procStatus(t *testing.T, pid int) map[string]string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

func hexMask(t *testing.T, s string) uint64 {
	v, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		t.Fatalf("capability mask %q: %v", s, err)
	}
	return v
}

// loadDaemonSet decodes deploy/daemonset.yaml (strictly) and returns it with
// its agent container.
func loadDaemonSet(t *testing.T) (*appsv1.DaemonSet, *corev1.Container) {
	b, err := fs.ReadFile(Manifests, "daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	obj, err := decodeStrict(b)
	if err != nil {
		t.Fatalf("daemonset.yaml: %v", err)
	}
	ds := obj.(*appsv1.DaemonSet)
	for i, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "agent" {
			return ds, &ds.Spec.Template.Spec.Containers[i]
		}
	}
	t.Fatal("daemonset.yaml has no container named agent")
	return nil, nil
}

// buildStatic builds ./cmd/memprof as the image ships it (CGO_ENABLED=0,
// -trimpath, as in the Dockerfile and `make image`).
func buildStatic(t *testing.T) string {
	out := filepath.Join(t.TempDir(), "memprof")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/memprof")
	cmd.Dir = testprog.Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build ./cmd/memprof: %v\n%s", err, b)
	}
	return out
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// TestImageLeastPrivilege builds the shipped image without Docker
// (internal/image, as `make image` does), imports it into a private
// containerd and runs it over CRI as the kubelet would run the DaemonSet's
// agent container: the capabilities, privileged flag, user, read-only root,
// no-new-privileges, seccomp profile, hostPID, volume mounts (with their
// propagation), args, env and resource limits are all taken from the parsed
// deploy/daemonset.yaml, so the test fails when the manifest stops granting
// what the agent needs. The agent must then find a runc container of an
// annotated pod on the node through the mounted CRI socket, profile it
// (128 MiB leaked: live heap within 25%) and serve it on /metrics.
//
// Stand-ins for the node, the only departures from the manifest: the pod
// network is the host's (no CNI here; POD_IP is 127.0.0.1 and the port a free
// one), and the hostPath volumes holding node state rather than kernel
// interfaces point at the test's containerd and directories: /run/containerd
// (its socket directory), /run/crio (empty), /var/log/pods, /var/lib/memprof;
// the Secret and emptyDir volumes are temporary directories. A hostPath
// mounted with propagation must be a shared mount on the host (systemd
// makes every mount shared on a real node); where it is private, as on the
// test machines, a recursive bind of it made shared stands in (see
// sharedBind). /proc,
// /sys/fs/cgroup, /sys/kernel/btf and /sys/kernel/tracing are the host's.
// Capabilities missing from this host's bounding set cannot be granted to
// any container here; they are left out and logged (the agent must work
// without them, which shows they are not needed on this kernel).
func TestImageLeastPrivilege(t *testing.T) {
	testprog.RequireRoot(t)
	ds, c := loadDaemonSet(t)
	pod := ds.Spec.Template.Spec

	// the image, as `make image` builds it
	t0 := time.Now()
	bin := buildStatic(t)
	img, err := image.Build(bin)
	if err != nil {
		t.Fatal(err)
	}
	imgTar := filepath.Join(t.TempDir(), "memprof-image.tar")
	if err := image.Write(imgTar, c.Image, img); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	t.Logf("image %s %s built in %s", c.Image, digest, time.Since(t0).Round(time.Millisecond))

	cd := kube.StartContainerd(t, "image")
	pauseBin := testprog.Build(t, "k8s_pause.c", "-static")
	workBin := testprog.Build(t, "agent_workload.c")
	files := map[string]string{"/pause": pauseBin, "/agent_workload": workBin}
	for _, lib := range kube.Libs(t, workBin) {
		files[lib] = lib
	}
	cd.ImportImage(t, files, "/pause")
	cd.ImportArchive(t, imgTar)
	logs := filepath.Join(cd.Dir, "pods")

	// an annotated workload pod on the node, run by containerd with runc
	ns := "shop-" + kube.RandHex(6)
	wsb := cd.RunPodSandbox(t, kube.Pod{Namespace: ns, Name: "cart", UID: kube.NewUID()}, logs, map[string]string{"memprof.io/profile": "true"})
	// 256 samples at the default 512 KiB rate: the estimate's relative
	// standard deviation is about 1/sqrt(256) = 6%, so ±25% is 4 sigma
	const leak = 128 << 20
	_, wpid := cd.StartContainer(t, wsb, "app", []string{"/agent_workload", "leak", strconv.Itoa(leak), strconv.Itoa(64 << 10)})
	// past runc's exec: a process the agent finds still in runc's init is
	// attached with runc's libraries and not again after the exec (a
	// recorder issue of its own)
	kube.WaitFor(t, 10*time.Second, "the workload to exec", func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", wpid))
		return strings.TrimSpace(string(b)) == "agent_workload"
	})

	// the agent pod as the kubelet would create it from the manifest
	port := freePort(t)
	token := kube.RandHex(32)
	nodeName := "node-" + kube.RandHex(4)
	fake := map[string]string{ // hostPath -> the test's stand-in
		"/var/log/pods":    logs,
		"/run/containerd":  cd.Dir,
		"/run/crio":        t.TempDir(),
		"/var/lib/memprof": t.TempDir(),
	}
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	var mounts []*runtimeapi.Mount
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Fatalf("mount %s: no volume %s", m.MountPath, m.Name)
		}
		if m.SubPath != "" {
			t.Fatalf("mount %s: subPath is not supported by this test", m.MountPath)
		}
		var host string
		switch {
		case v.HostPath != nil:
			host = v.HostPath.Path
			if f, ok := fake[host]; ok {
				host = f
			} else if _, err := os.Stat(host); err != nil {
				t.Fatalf("hostPath %s of volume %s: %v", host, v.Name, err)
			}
		case v.Secret != nil:
			host = t.TempDir()
			if err := os.WriteFile(filepath.Join(host, "token"), []byte(token), 0o400); err != nil {
				t.Fatal(err)
			}
		case v.EmptyDir != nil:
			host = t.TempDir()
		default:
			t.Fatalf("volume %s: type not supported by this test: %+v", v.Name, v.VolumeSource)
		}
		prop := runtimeapi.MountPropagation_PROPAGATION_PRIVATE
		if m.MountPropagation != nil {
			switch *m.MountPropagation {
			case corev1.MountPropagationHostToContainer:
				prop = runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER
			case corev1.MountPropagationBidirectional:
				prop = runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL
			}
		}
		if prop != runtimeapi.MountPropagation_PROPAGATION_PRIVATE && !sharedMount(t, host) {
			host = sharedBind(t, host)
		}
		mounts = append(mounts, &runtimeapi.Mount{ContainerPath: m.MountPath, HostPath: host, Readonly: m.ReadOnly, Propagation: prop})
	}

	env := map[string]string{}
	var envs []*runtimeapi.KeyValue
	for _, e := range c.Env {
		val := e.Value
		if e.ValueFrom != nil {
			switch e.ValueFrom.FieldRef.FieldPath {
			case "status.podIP":
				val = "127.0.0.1"
			case "spec.nodeName":
				val = nodeName
			default:
				t.Fatalf("env %s: field %s not supported by this test", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		}
		env[e.Name] = val
		envs = append(envs, &runtimeapi.KeyValue{Key: e.Name, Value: []byte(val)})
	}
	// the kubelet expands $(VAR) in args from the container's env
	expand := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	var args []string
	listen := ""
	for _, a := range c.Args {
		a = expand.ReplaceAllStringFunc(a, func(m string) string { return env[m[2:len(m)-1]] })
		if v, ok := strings.CutPrefix(a, "--listen="); ok {
			host, p, err := net.SplitHostPort(v)
			if err != nil || p != strconv.Itoa(int(c.Ports[0].ContainerPort)) {
				t.Fatalf("--listen=%s: want the container port %d", v, c.Ports[0].ContainerPort)
			}
			listen = net.JoinHostPort(host, port)
			a = "--listen=" + listen
		}
		args = append(args, a)
	}
	if listen == "" {
		t.Fatalf("the manifest's args %q have no --listen", c.Args)
	}

	// the security context, converted as the kubelet does
	sc := c.SecurityContext
	bounding := hexMask(t, procStatus(t, os.Getpid())["CapBnd"])
	var adds, drops, missing []string
	var wantCaps uint64
	for _, cp := range sc.Capabilities.Add {
		if bounding&capBit(t, string(cp)) == 0 {
			missing = append(missing, string(cp))
			continue
		}
		adds = append(adds, string(cp))
		wantCaps |= capBit(t, string(cp))
	}
	for _, cp := range sc.Capabilities.Drop {
		drops = append(drops, string(cp))
	}
	if !slices.Equal(drops, []string{"ALL"}) {
		t.Fatalf("capabilities drop %v: the test expects ALL (only the added ones remain)", drops)
	}
	if len(missing) > 0 {
		t.Logf("this host's bounding set (%#x) lacks %v, which no container can get here: run without them", bounding, missing)
	}
	seccomp := &runtimeapi.SecurityProfile{ProfileType: runtimeapi.SecurityProfile_RuntimeDefault}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Fatalf("seccompProfile %+v: the test expects RuntimeDefault", sc.SeccompProfile)
	}
	pidNS := runtimeapi.NamespaceMode_CONTAINER
	if pod.HostPID {
		pidNS = runtimeapi.NamespaceMode_NODE
	}
	nsOpts := &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE, Pid: pidNS}
	lsc := &runtimeapi.LinuxContainerSecurityContext{
		Capabilities:     &runtimeapi.Capability{AddCapabilities: adds, DropCapabilities: drops},
		Privileged:       sc.Privileged != nil && *sc.Privileged,
		NamespaceOptions: nsOpts,
		ReadonlyRootfs:   sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem,
		NoNewPrivs:       sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation,
		Seccomp:          seccomp,
	}
	if sc.RunAsUser != nil {
		lsc.RunAsUser = &runtimeapi.Int64Value{Value: *sc.RunAsUser}
	}
	res := &runtimeapi.LinuxContainerResources{CpuPeriod: 100000}
	if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		res.MemoryLimitInBytes = q.Value()
	}
	if q, ok := c.Resources.Limits[corev1.ResourceCPU]; ok {
		res.CpuQuota = q.MilliValue() * 100000 / 1000
	}
	if q, ok := c.Resources.Requests[corev1.ResourceCPU]; ok {
		res.CpuShares = q.MilliValue() * 1024 / 1000
	}

	asb := cd.RunPodSandbox(t, kube.Pod{Namespace: ds.Namespace, Name: ds.Name + "-" + kube.RandHex(5), UID: kube.NewUID()}, logs, nil,
		func(cfg *runtimeapi.PodSandboxConfig) { cfg.Linux.SecurityContext.NamespaceOptions = nsOpts })
	aid, apid := cd.StartContainerConfig(t, asb, &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: c.Name},
		Image:    &runtimeapi.ImageSpec{Image: c.Image},
		Command:  c.Command,
		Args:     args,
		Envs:     envs,
		Mounts:   mounts,
		Linux:    &runtimeapi.LinuxContainerConfig{Resources: res, SecurityContext: lsc},
	})
	agentLog := func() string { return asb.ContainerLog(c.Name) }
	defer func() {
		if t.Failed() {
			t.Logf("agent container log:\n%s", agentLog())
		}
	}()

	// the agent process runs with exactly the manifest's privileges
	st := procStatus(t, apid)
	if st == nil {
		t.Fatalf("the agent (pid %d) exited at once:\n%s", apid, agentLog())
	}
	t.Logf("agent pid %d (host): CapEff %v, Seccomp %s, NoNewPrivs %s", apid, capList(hexMask(t, st["CapEff"])), st["Seccomp"], st["NoNewPrivs"])
	for _, f := range []string{"CapEff", "CapPrm", "CapBnd"} {
		if got := hexMask(t, st[f]); got != wantCaps {
			t.Errorf("agent %s %v, want the manifest's %v", f, capList(got), capList(wantCaps))
		}
	}
	if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" || st["Uid"] == "" || strings.Fields(st["Uid"])[0] != "0" {
		t.Errorf("agent Seccomp %s NoNewPrivs %s Uid %s: want 2 (filter, RuntimeDefault), 1, 0", st["Seccomp"], st["NoNewPrivs"], st["Uid"])
	}
	if mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", apid)); err == nil {
		for _, line := range strings.Split(string(mi), "\n") {
			if f := strings.Fields(line); len(f) > 5 && f[4] == "/" && !strings.HasPrefix(f[5], "ro") {
				t.Errorf("agent root filesystem mounted %s, want ro (readOnlyRootFilesystem)", f[5])
			}
		}
	}

	base := "http://" + listen
	client := &http.Client{Timeout: 5 * time.Second}
	fetch := func(path string, auth bool) (int, string) {
		req, _ := http.NewRequest("GET", base+path, nil)
		if auth {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitUntil := func(d time.Duration, what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out after %s waiting for %s", d, what)
			}
			if s := procStatus(t, apid); s == nil {
				t.Fatalf("the agent exited while waiting for %s", what)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	t1 := time.Now()
	waitUntil(60*time.Second, "the agent's /healthz", func() bool { code, _ := fetch("/healthz", false); return code == 200 })
	t.Logf("agent ready %s after its container started", time.Since(t1).Round(time.Millisecond))
	// The DaemonSet's capabilities (BPF, PERFMON; no NET_ADMIN) load the
	// process and cgroup event programs: discovery follows events.
	waitUntil(10*time.Second, "the agent to take process events from BPF (its log)", func() bool {
		return strings.Contains(agentLog(), "process events from bpf")
	})

	sel := map[string]string{"namespace": ns, "pod": "cart", "container": "app", "node": nodeName}
	var metrics string
	waitUntil(30*time.Second, "the agent to profile the workload container (/metrics)", func() bool {
		_, metrics = fetch("/metrics", false)
		v, ok := metricValue(metrics, "memprof_container_profiled_processes", sel)
		return ok && v >= 1
	})
	if err := syscall.Kill(wpid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var live float64
	waitUntil(20*time.Second, "the leak in memprof_container_live_heap_bytes", func() bool {
		_, metrics = fetch("/metrics", false)
		live, _ = metricValue(metrics, "memprof_container_live_heap_bytes", sel)
		return live > leak/2
	})
	time.Sleep(time.Second)
	_, metrics = fetch("/metrics", false)
	live, _ = metricValue(metrics, "memprof_container_live_heap_bytes", sel)
	t.Logf("/metrics: %s/cart/app live heap %.2f MiB (%d MiB leaked)", ns, live/(1<<20), leak>>20)
	if math.Abs(live-leak) > 0.25*leak {
		t.Errorf("live heap %.0f bytes, want %d ±25%%", live, leak)
	}
	code, list := fetch("/profiles", true)
	var infos []struct {
		Namespace, Pod, Container string
		Pids                      []int
	}
	if err := json.Unmarshal([]byte(list), &infos); code != 200 || err != nil || len(infos) != 1 ||
		infos[0].Pod != "cart" || infos[0].Container != "app" || !slices.Contains(infos[0].Pids, wpid) {
		t.Errorf("/profiles: %d %s (%v); want only %s/cart/app with the workload's host pid %d", code, list, err, ns, wpid)
	}
	if code, _ := fetch("/profiles", false); code != http.StatusUnauthorized {
		t.Errorf("/profiles without the token: %d, want 401", code)
	}
	if code, body := fetch("/profiles/heap?namespace="+ns+"&pod=cart", true); code != 200 || len(body) < 100 {
		t.Errorf("/profiles/heap: %d, %d bytes", code, len(body))
	}
	if st := procStatus(t, apid); st != nil {
		t.Logf("agent VmRSS %s (memory limit %d MiB)", st["VmRSS"], res.MemoryLimitInBytes>>20)
	}

	// SIGTERM with the manifest's grace period: a clean stop
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*pod.TerminationGracePeriodSeconds+10)*time.Second)
	defer cancel()
	if _, err := cd.Runtime.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: aid, Timeout: *pod.TerminationGracePeriodSeconds}); err != nil {
		t.Fatalf("CRI StopContainer: %v", err)
	}
	cs, err := cd.Runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: aid})
	if err != nil {
		t.Fatal(err)
	}
	if cs.Status.ExitCode != 0 || !strings.Contains(agentLog(), `msg="agent stopped" detached_containers=1`) {
		t.Errorf("agent stopped with exit code %d (%s); want 0 and a clean detach", cs.Status.ExitCode, cs.Status.Reason)
	}
}

// sharedMount tells whether the mount holding path propagates (shared or
// slave), which containerd requires of the source of a mount with
// HostToContainer propagation.
func sharedMount(t *testing.T, path string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	best, shared := "", false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 7 {
			continue
		}
		mp := f[4]
		if (path == mp || strings.HasPrefix(path, strings.TrimSuffix(mp, "/")+"/")) && len(mp) >= len(best) {
			best, shared = mp, false
			for _, opt := range f[6:] {
				if opt == "-" {
					break
				}
				if strings.HasPrefix(opt, "shared:") || strings.HasPrefix(opt, "master:") {
					shared = true
				}
			}
		}
	}
	return shared
}

// sharedBind binds src and every mount below it (MS_BIND|MS_REC) on a new
// directory and makes that copy shared (MS_SHARED|MS_REC), leaving src's own
// propagation alone; mounts appearing under src later are not seen there,
// but new cgroups are (the same file systems). It returns the directory,
// detached and removed (not recursively: it holds the host's files) when
// the test ends.
func sharedBind(t *testing.T, src string) string {
	dir, err := os.MkdirTemp("", "mpshared")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(src, dir, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		os.Remove(dir)
		t.Fatalf("bind %s on %s: %v", src, dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
			return
		}
		os.Remove(dir)
	})
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		t.Fatalf("make %s shared: %v", dir, err)
	}
	t.Logf("hostPath %s is a private mount here: its shared recursive bind %s stands in", src, dir)
	return dir
}

// metricValue finds a sample of the exposition text whose labels include
// want.
func metricValue(text, name string, want map[string]string) (float64, bool) {
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf(`%s="%s"`, k, v)) {
				ok = false
			}
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); ok && err == nil {
			return v, true
		}
	}
	return 0, false
}
