package kube

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// MkCgroup creates root/rel (and its missing parents) as real cgroups and
// removes what it created when the test ends, deepest first. Processes must
// be gone by then: register process cleanups after calling MkCgroup.
func MkCgroup(t testing.TB, root, rel string) string {
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
			t.Fatalf("create cgroup %s: %v (tests need root and a writable cgroup hierarchy)", dir, err)
		}
	}
	t.Cleanup(func() {
		for i := len(created) - 1; i >= 0; i-- {
			RmCgroup(t, created[i])
		}
	})
	return dir
}

// RmCgroup removes a cgroup directory, retrying briefly while the kernel
// finishes tearing down exited tasks. It reports failure with t.Errorf.
func RmCgroup(t testing.TB, dir string) bool {
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

// PidsRecursive lists the processes of the cgroup dir and its descendants.
func PidsRecursive(dir string) []int {
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

// RemoveCgroupTree removes /sys/fs/cgroup/<hierarchy>/<top> and everything
// below it, deepest first, in every mounted hierarchy. top is unique to one
// test run, so any process still in it was started by that test (a
// container whose runtime failed to stop it): those are killed first, by
// pid. Runtimes create the path in every hierarchy and remove only the
// leaf, so tests register this for their cgroup root.
func RemoveCgroupTree(t testing.TB, top string) {
	hs, _ := os.ReadDir("/sys/fs/cgroup")
	killed := false
	for _, h := range hs {
		root := filepath.Join("/sys/fs/cgroup", h.Name(), top)
		for _, pid := range PidsRecursive(root) {
			comm, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
			t.Logf("killing leftover process %d (%s) in test cgroup %s", pid, strings.TrimSpace(string(comm)), root)
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
			if !RmCgroup(t, dirs[i]) {
				break // its parents cannot go either
			}
		}
	}
}
