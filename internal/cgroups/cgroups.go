// Package cgroups reads and manages memory cgroups, version 1 (the memory
// controller's own hierarchy) and version 2 (the unified hierarchy), for the
// OOM flight recorder: memory statistics as the kernel and kubelet see them,
// the directory of a cgroup id reported by BPF, the cgroups of a process, and
// creating, filling and removing limited memory cgroups (tests, demos).
//
// Statistics are read with github.com/containerd/cgroups/v3; the few values
// that library does not parse (v1 total_shmem, v2 kernel) are read from the
// same memory.stat file.
package cgroups

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/memprof/memprof/internal/procmaps"
	"golang.org/x/sys/unix"
)

// Base is the directory where the cgroup file systems are mounted. The
// Kubernetes agent points it at the host's cgroup mount (for example
// /host/sys/fs/cgroup) when it runs inside its own container.
var Base = "/sys/fs/cgroup"

// Root returns the mount point of the v1 memory controller hierarchy and of
// the v2 (unified) hierarchy under Base. On hybrid hosts that is
// Base/memory and Base/unified; on pure v2 hosts "" and Base; either is ""
// when that hierarchy is absent.
func Root() (v1Memory string, v2 string) {
	if isFS(Base, unix.CGROUP2_SUPER_MAGIC) {
		return "", Base
	}
	if m := filepath.Join(Base, "memory"); isFS(m, unix.CGROUP_SUPER_MAGIC) {
		v1Memory = m
	}
	if u := filepath.Join(Base, "unified"); isFS(u, unix.CGROUP2_SUPER_MAGIC) {
		v2 = u
	}
	return v1Memory, v2
}

// isFS reports whether path is on a file system with the given magic.
func isFS(path string, magic int64) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return int64(st.Type) == magic
}

// Version returns 1 or 2 for a directory on a cgroup v1 or v2 file system.
func Version(dir string) (int, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("cgroup directory %s: %w (check that it exists and that the cgroup file system is mounted under %s)", dir, err, Base)
	}
	switch int64(st.Type) {
	case unix.CGROUP_SUPER_MAGIC:
		return 1, nil
	case unix.CGROUP2_SUPER_MAGIC:
		return 2, nil
	}
	return 0, fmt.Errorf("%s is not on a cgroup file system (statfs type %#x); pass a directory under %s", dir, st.Type, Base)
}

// OfProcess returns the v1 memory cgroup and the v2 cgroup of process pid as
// the paths /proc/PID/cgroup gives (/proc is procmaps.ProcRoot), relative to the hierarchy roots (and to
// the cgroup namespace of the reader). A path is "" when the process is not
// in that hierarchy (no v1 memory controller, or no v2 hierarchy).
func OfProcess(pid int) (v1Memory string, v2 string, err error) {
	path := filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "cgroup")
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", "", fmt.Errorf("read %s: process %d is gone: %w", path, pid, err)
		}
		return "", "", fmt.Errorf("read %s: %w (memprof needs to read other processes' /proc entries: run as root)", path, err)
	}
	return parseProcCgroup(data)
}

func parseProcCgroup(data []byte) (v1Memory, v2 string, err error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			v2 = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				v1Memory = parts[2]
			}
		}
	}
	return v1Memory, v2, sc.Err()
}

// Procs lists the processes in the cgroup dir (any hierarchy), and in all
// its descendants when recursive is set.
func Procs(dir string, recursive bool) ([]int, error) {
	seen := map[int]bool{}
	var out []int
	var buf []byte
	add := func(d string) error {
		data, err := readFileRaw(filepath.Join(d, "cgroup.procs"), &buf)
		if err != nil {
			return fmt.Errorf("list processes of cgroup %s: %w (the cgroup may have been removed)", d, err)
		}
		for _, f := range strings.Fields(string(data)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				return fmt.Errorf("cgroup %s: bad pid %q in cgroup.procs", d, f)
			}
			if !seen[pid] {
				seen[pid] = true
				out = append(out, pid)
			}
		}
		return nil
	}
	if !recursive {
		return out, add(dir)
	}
	for _, d := range subdirs(dir) {
		if err := add(d); err != nil {
			if _, serr := os.Stat(d); serr != nil && d != dir {
				continue // child removed while walking
			}
			return nil, err
		}
	}
	return out, nil
}

// readFileRaw reads a small kernel file with plain open, read and close
// system calls into *buf (grown as needed and reused): os.ReadFile adds an
// fstat and the runtime poller's registration attempt, which double the
// cost of a cgroup.procs read repeated for every followed cgroup.
func readFileRaw(path string, buf *[]byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	if cap(*buf) < 4096 {
		*buf = make([]byte, 0, 4096)
	}
	b := (*buf)[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := unix.Read(fd, b[len(b):cap(b)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if n == 0 {
			*buf = b
			return b, nil
		}
		b = b[:len(b)+n]
	}
}

// Subdirs returns dir and all directories below it, parents first (a
// leaf cgroup costs one stat; see subdirs).
func Subdirs(dir string) []string { return subdirs(dir) }

// subdirs returns dir and all directories below it, parents first. A
// cgroup directory's link count is 2 plus its number of child cgroups
// (kernfs counts them as ext4 does), so a leaf, the usual container
// cgroup, costs one stat instead of a directory listing.
func subdirs(dir string) []string {
	out := []string{dir}
	for i := 0; i < len(out); i++ {
		var st unix.Stat_t
		if unix.Stat(out[i], &st) == nil && st.Nlink == 2 {
			continue
		}
		ents, err := os.ReadDir(out[i])
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				out = append(out, filepath.Join(out[i], e.Name()))
			}
		}
	}
	return out
}

// unlimited reports whether a v1 limit value means "no limit" (the kernel
// prints PAGE_COUNTER_MAX rounded to pages, 9223372036854771712).
func unlimited(v uint64) bool { return v == 0 || v >= math.MaxInt64/2 }

// isGone reports whether err says the cgroup (or process) no longer exists.
func isGone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ESRCH)
}
