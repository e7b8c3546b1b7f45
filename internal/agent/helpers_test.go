package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
)

// Patterns below follow internal/podfind's test helpers.

func randHex(n int) string {
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func newUID() string {
	h := randHex(32)
	return h[:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:]
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
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

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func rmCgroup(t *testing.T, dir string) bool {
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return true
		}
		if time.Now().After(deadline) {
			t.Errorf("remove cgroup %s: %v (remove it by hand with rmdir)", dir, err)
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// mkCgroup creates root/rel as real cgroups, removed when the test ends.
func mkCgroup(t *testing.T, root, rel string) string {
	t.Helper()
	dir := root
	var created []string
	for _, c := range strings.Split(strings.Trim(rel, "/"), "/") {
		dir = filepath.Join(dir, c)
		err := os.Mkdir(dir, 0o755)
		if err == nil {
			created = append(created, dir)
			continue
		}
		if !errors.Is(err, fs.ErrExist) {
			t.Fatalf("create cgroup %s: %v", dir, err)
		}
	}
	t.Cleanup(func() {
		for i := len(created) - 1; i >= 0; i-- {
			rmCgroup(t, created[i])
		}
	})
	return dir
}

func readPidsRecursive(dir string) []int {
	var pids []int
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				pids = append(pids, n)
			}
		}
		return nil
	})
	return pids
}

// removeCgroupTree removes /sys/fs/cgroup/<hierarchy>/<top> in every
// hierarchy, killing (by pid) leftover processes of this test first.
func removeCgroupTree(t *testing.T, top string) {
	hs, _ := os.ReadDir("/sys/fs/cgroup")
	killed := false
	for _, h := range hs {
		for _, pid := range readPidsRecursive(filepath.Join("/sys/fs/cgroup", h.Name(), top)) {
			syscall.Kill(pid, syscall.SIGKILL)
			killed = true
		}
	}
	if killed {
		time.Sleep(200 * time.Millisecond)
	}
	for _, h := range hs {
		root := filepath.Join("/sys/fs/cgroup", h.Name(), top)
		if _, err := os.Stat(root); err != nil {
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
				break
			}
		}
	}
}

// rootfs builds a container root with bin and the libraries it links
// (its own copy of libc).
func rootfs(t *testing.T, bin string) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "rootfs")
	for _, d := range []string{"proc", "dev", "sys", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, bin, filepath.Join(root, filepath.Base(bin)), 0o755)
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd %s: %v\n%s", bin, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				copyFile(t, f, filepath.Join(root, f), 0o755)
			}
		}
	}
	return root
}

// pod is a fake kubelet pod: a cgroup parent under a test-unique root and a
// /var/log/pods entry.
type pod struct {
	ns, name, uid string
}

// ctr is a container started with runc.
type ctr struct {
	id, cgPath string
	pid        int
	stdout     string
	rc         func(args ...string) *exec.Cmd
}

// runContainer starts a runc container of pod p named name, running args
// in the rootfs, in the cgroup /<fsRoot>/kubepods/burstable/pod<uid>/<id>
// with an optional memory limit, the kubelet's termination-log mount and
// the pod's log directory.
func runContainer(t *testing.T, fsRoot, root, logs string, p pod, name string, memLimit int64, args ...string) *ctr {
	t.Helper()
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc not found: install the Debian package runc: %v", err)
	}
	tmp := t.TempDir()
	bundle := filepath.Join(tmp, "bundle")
	if err := os.MkdirAll(bundle, 0o755); err != nil {
		t.Fatal(err)
	}
	id := randHex(64)
	c := &ctr{id: id, cgPath: "/" + fsRoot + "/kubepods/burstable/pod" + p.uid + "/" + id}
	termLog := filepath.Join(tmp, "kubelet", "pods", p.uid, "containers", name, randHex(8))
	writeFile(t, termLog, "")
	writeFile(t, filepath.Join(logs, p.ns+"_"+p.name+"_"+p.uid, name, "0.log"), "")
	if out, err := exec.Command(runc, "spec", "-b", bundle).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v\n%s", err, out)
	}
	cfgPath := filepath.Join(bundle, "config.json")
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = args
	spec["root"] = map[string]any{"path": root, "readonly": true}
	spec["mounts"] = append(spec["mounts"].([]any), map[string]any{
		"destination": "/dev/termination-log", "type": "bind", "source": termLog,
		"options": []string{"rbind", "rw"},
	})
	lin := spec["linux"].(map[string]any)
	lin["cgroupsPath"] = c.cgPath
	if memLimit > 0 {
		res, _ := lin["resources"].(map[string]any)
		if res == nil {
			res = map[string]any{}
		}
		res["memory"] = map[string]any{"limit": memLimit}
		lin["resources"] = res
	}
	raw, _ = json.MarshalIndent(spec, "", "  ")
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(tmp, "runc-state")
	c.rc = func(args ...string) *exec.Cmd {
		return exec.Command(runc, append([]string{"--root", state}, args...)...)
	}
	t.Cleanup(func() { c.rc("delete", "-f", id).Run() })
	c.stdout = filepath.Join(tmp, "stdout")
	f, err := os.Create(c.stdout)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	run := c.rc("run", "-d", "-b", bundle, id)
	run.Stdout, run.Stderr = f, f
	if err := run.Run(); err != nil {
		b, _ := os.ReadFile(c.stdout)
		t.Fatalf("runc run -d: %v\n%s", err, b)
	}
	out, err := c.rc("state", id).Output()
	if err != nil {
		t.Fatalf("runc state: %v", err)
	}
	var st struct{ Pid int }
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v: %s", id, err, out)
	}
	c.pid = st.Pid
	return c
}

func (c *ctr) output() string {
	b, _ := os.ReadFile(c.stdout)
	return string(b)
}

func (c *ctr) delete(t *testing.T) {
	if out, err := c.rc("delete", "-f", c.id).CombinedOutput(); err != nil {
		t.Errorf("runc delete -f: %v\n%s", err, out)
	}
}

// startAgent runs an agent for the test; it is stopped (as by SIGTERM) and
// must return cleanly when the test ends, or earlier by calling stop.
func startAgent(t *testing.T, cfg Config) (*Agent, string, func()) {
	t.Helper()
	tok := randHex(32)
	if cfg.TokenFile == "" {
		cfg.TokenFile = filepath.Join(t.TempDir(), "token")
		writeFile(t, cfg.TokenFile, tok+"\n")
	}
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	cfg.Listen = "127.0.0.1:0"
	if cfg.NodeName == "" {
		cfg.NodeName = "test-node"
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("agent.Run returned %v after shutdown", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("agent did not stop within 20s of cancellation")
			}
		})
	}
	t.Cleanup(stop)
	waitFor(t, 20*time.Second, "the agent to load its programs", func() bool {
		select {
		case err := <-done:
			t.Fatalf("agent.Run: %v", err)
		default:
		}
		return a.Ready()
	})
	return a, tok, stop
}

// bpfFDs counts this process's BPF map, program and link descriptors.
func bpfFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		if strings.HasPrefix(l, "anon_inode:bpf") {
			n++
		}
	}
	return n
}

func get(t *testing.T, url, token string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// metric finds a sample of the exposition text whose labels include want.
func metric(text, name string, want map[string]string) (float64, bool) {
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf(`%s="%s"`, k, v)) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			return v, true
		}
	}
	return 0, false
}

func findContainer(a *Agent, ns, pod string) *ContainerInfo {
	for _, c := range a.Containers() {
		if c.Namespace == ns && c.Pod == pod {
			return &c
		}
	}
	return nil
}

var _ = podfind.Paths{}

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
