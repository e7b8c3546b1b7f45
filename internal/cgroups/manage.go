package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/memprof/memprof/internal/procmaps"
)

// Create makes the memory cgroup dir with a memory limit of limit bytes (0 =
// unlimited). On v1, dir is under the memory controller's mount and the
// limit goes to memory.limit_in_bytes (and memory.memsw.limit_in_bytes when
// the host has swap, so the group cannot escape to swap; without swap it is
// left alone because then failed charges would count in no failcnt on
// 6.x kernels, measured on 6.18); on v2 it goes
// to memory.max after enabling the memory controller in the ancestors.
func Create(dir string, limit uint64) error {
	dir = filepath.Clean(dir)
	ver, err := Version(filepath.Dir(dir))
	if err != nil {
		return fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	if ver == 2 {
		mount, group := v2Split(filepath.Dir(dir))
		group = filepath.Join(group, filepath.Base(dir))
		res := &cgroup2.Resources{}
		if limit > 0 {
			l := int64(limit)
			res.Memory = &cgroup2.Memory{Max: &l}
		}
		if _, err := cgroup2.NewManager(mount, group, res); err != nil {
			return fmt.Errorf("create v2 cgroup %s with memory.max=%d: %w (the memory controller must be available in %s/cgroup.controllers)", dir, limit, err, mount)
		}
		return nil
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create v1 memory cgroup %s: %w (run as root; the parent must be under the memory controller mount)", dir, err)
	}
	if limit == 0 {
		return nil
	}
	v := []byte(strconv.FormatUint(limit, 10))
	if err := os.WriteFile(filepath.Join(dir, "memory.limit_in_bytes"), v, 0); err != nil {
		return fmt.Errorf("set memory.limit_in_bytes=%d on %s: %w", limit, dir, err)
	}
	if sw := filepath.Join(dir, "memory.memsw.limit_in_bytes"); exists(sw) && hostHasSwap() {
		if err := os.WriteFile(sw, v, 0); err != nil {
			return fmt.Errorf("set memory.memsw.limit_in_bytes=%d on %s: %w", limit, dir, err)
		}
	}
	return nil
}

// AddProcess moves process pid into the cgroup dir (any hierarchy).
func AddProcess(dir string, pid int) error {
	p := filepath.Join(dir, "cgroup.procs")
	if err := os.WriteFile(p, []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move process %d into cgroup %s (write %s): %w (the process may have exited, or memprof is not root)", pid, dir, p, err)
	}
	return nil
}

// Remove kills every process left in dir and its descendants (SIGKILL),
// then removes the directories, deepest first, retrying while the kernel
// still holds them busy (up to 5 s). A dir that does not exist is not an
// error.
func Remove(dir string) error {
	dir = filepath.Clean(dir)
	if !exists(dir) {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids, _ := Procs(dir, true)
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		dirs := subdirs(dir)
		var lastErr error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				lastErr = err
			}
		}
		if lastErr == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w (processes %v still inside; check for unkillable (D state) tasks)", dir, lastErr, pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// hostHasSwap reports whether any swap area is active (/proc/swaps has more
// than its header line).
func hostHasSwap() bool {
	b, err := os.ReadFile(filepath.Join(procmaps.ProcRoot, "swaps"))
	if err != nil {
		return false
	}
	return len(strings.Split(strings.TrimSpace(string(b)), "\n")) > 1
}
