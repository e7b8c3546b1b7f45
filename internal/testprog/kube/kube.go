// Package kube holds test fixtures that stand in for a Kubernetes node:
// kubelet-style cgroup layouts, /var/log/pods entries, container root
// filesystems with their own libc, runc containers and a private containerd
// driven over CRI. Every helper takes a testing.TB, fails the test on error
// and undoes what it created with t.Cleanup. Tests using it run as root.
package kube

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// RandHex returns n random hex digits (n even).
func RandHex(n int) string {
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// NewUID returns a random pod UID in the API server's format (UUID v4).
func NewUID() string {
	h := RandHex(32)
	return h[:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:]
}

// NewID returns a random 64-hex container id.
func NewID() string { return RandHex(64) }

// WriteFile writes a file, creating its parents.
func WriteFile(t testing.TB, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// CopyFile copies src to dst with the given mode, creating dst's parents.
func CopyFile(t testing.TB, src, dst string, mode os.FileMode) {
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

// WaitFor polls cond until it holds, failing the test after timeout.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Libs lists the host paths of the shared libraries bin links (ldd).
func Libs(t testing.TB, bin string) []string {
	t.Helper()
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd %s: %v\n%s", bin, err, out)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
			}
		}
	}
	return libs
}

// Rootfs builds a container root filesystem in a temporary directory with
// bin at /<base name of bin> and the libraries it links at their host paths
// (so the container has its own copy of libc, a different inode than the
// host's), plus empty /proc, /dev, /sys and /tmp.
func Rootfs(t testing.TB, bin string) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "rootfs")
	for _, d := range []string{"proc", "dev", "sys", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	CopyFile(t, bin, filepath.Join(root, filepath.Base(bin)), 0o755)
	for _, lib := range Libs(t, bin) {
		CopyFile(t, lib, filepath.Join(root, lib), 0o755)
	}
	return root
}

// Pod is a fake kubelet pod.
type Pod struct {
	Namespace, Name, UID string
}

// LogDir is the pod's directory under the kubelet's pod log root
// (/var/log/pods/<namespace>_<name>_<uid>).
func (p Pod) LogDir(logs string) string {
	return filepath.Join(logs, p.Namespace+"_"+p.Name+"_"+p.UID)
}

// WriteLog creates the empty log file of the pod's container name under
// logs (<LogDir>/<name>/0.log), as the kubelet does when it starts it.
func (p Pod) WriteLog(t testing.TB, logs, name string) {
	t.Helper()
	WriteFile(t, filepath.Join(p.LogDir(logs), name, "0.log"), "")
}

// CgroupParent is the pod's cgroup under a test-unique cgroup root fsRoot
// with the kubelet's cgroupfs driver: /<fsRoot>/kubepods/<qos>/pod<uid>,
// qos being "burstable" or "besteffort" ("" for Guaranteed pods, which sit
// right under kubepods).
func (p Pod) CgroupParent(fsRoot, qos string) string {
	if qos == "" {
		return "/" + fsRoot + "/kubepods/pod" + p.UID
	}
	return "/" + fsRoot + "/kubepods/" + qos + "/pod" + p.UID
}
