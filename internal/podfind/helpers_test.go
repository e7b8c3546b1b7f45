package podfind

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/memprof/memprof/internal/testprog/kube"
)

// The fixtures shared with internal/agent's tests live in
// internal/testprog/kube; these names keep discover_test.go short.
var (
	randHex   = kube.RandHex
	newUID    = kube.NewUID
	newID     = kube.NewID
	mkCgroup  = kube.MkCgroup
	writeFile = kube.WriteFile
)

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
