package podfind

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func randHex(n int) string {
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// newUID returns a random pod UID in the API server's format (UUID v4).
func newUID() string {
	h := randHex(32)
	return h[:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:]
}

// newID returns a random 64-hex container id.
func newID() string { return randHex(64) }

// mkCgroup creates root/rel (and its missing parents) as real cgroups and
// removes what it created when the test ends, deepest first. Processes must be
// gone by then: register process cleanups after calling mkCgroup.
func mkCgroup(t *testing.T, root, rel string) string {
	t.Helper()
	comps := strings.Split(strings.Trim(rel, "/"), "/")
	dir := root
	var created []string
	for _, c := range comps {
		dir = filepath.Join(dir, c)
		err := os.Mkdir(dir, 0o755)
		if err == nil {
			created = append(created, dir)
			continue
		}
		if !errors.Is(err, fs.ErrExist) {
			t.Fatalf("create cgroup %s: %v (tests need root and a writable cgroup hierarchy)", dir, err)
		}
	}
	t.Cleanup(func() {
		for i := len(created) - 1; i >= 0; i-- {
			rmCgroup(t, created[i])
		}
	})
	return dir
}

// rmCgroup removes a cgroup directory, retrying briefly while the kernel
// finishes tearing down exited tasks.
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

// startProc runs a real process that lives until the test ends.
func startProc(t *testing.T, path string, args ...string) int {
	t.Helper()
	cmd := exec.Command(path, args...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd.Process.Pid
}

// moveInto writes pid into the cgroup's cgroup.procs.
func moveInto(t *testing.T, pid int, dir string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		t.Fatalf("move pid %d into cgroup %s: %v", pid, dir, err)
	}
}

// writeFile writes a file, creating its parents.
func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func byID(cs []Container) map[string]Container {
	m := map[string]Container{}
	for _, c := range cs {
		m[c.ID] = c
	}
	return m
}

func fmtContainer(c Container) string {
	return fmt.Sprintf("{ns=%q pod=%q uid=%s name=%q id=%.12s rt=%q qos=%q v1=%q v2=%q pids=%v src=%s}",
		c.Namespace, c.Pod, c.PodUID, c.Name, c.ID, c.Runtime, c.QoS, c.CgroupV1Memory, c.CgroupV2, c.Pids, c.Source)
}
