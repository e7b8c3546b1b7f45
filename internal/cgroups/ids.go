package cgroups

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// The id the kernel reports for a cgroup (v1 memcg kn->id from BPF, v2
// bpf_get_current_cgroup_id) is the kernfs node id, which on 64-bit hosts is
// the inode number of the cgroup's directory.

var idCache = struct {
	sync.Mutex
	byRoot map[string]map[uint64]string
}{byRoot: map[string]map[uint64]string{}}

// PathByID returns the directory under root (a hierarchy mount such as
// /sys/fs/cgroup/memory) whose inode number is id. Results are cached per
// root; on a miss, or when a cached directory no longer has that inode, the
// tree is walked again.
func PathByID(root string, id uint64) (string, error) {
	root = filepath.Clean(root)
	idCache.Lock()
	defer idCache.Unlock()
	if m := idCache.byRoot[root]; m != nil {
		if p, ok := m[id]; ok && inode(p) == id {
			return p, nil
		}
	}
	m := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == root {
				return err
			}
			return nil // a cgroup removed during the walk
		}
		if !d.IsDir() {
			return nil
		}
		if ino := inode(p); ino != 0 {
			m[ino] = p
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("walk cgroup hierarchy %s to find cgroup id %d: %w (check the mount and that memprof runs as root)", root, id, err)
	}
	idCache.byRoot[root] = m
	if p, ok := m[id]; ok {
		return p, nil
	}
	return "", fmt.Errorf("no cgroup with id %d under %s: it was removed (container deleted) or the id belongs to another hierarchy (v1 memory ids live under the memory controller, v2 ids under the unified tree)", id, root)
}

// ID returns the cgroup id of directory dir (its inode number).
func ID(dir string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup directory %s: %w", dir, err)
	}
	return st.Ino, nil
}

func inode(p string) uint64 {
	var st unix.Stat_t
	if unix.Stat(p, &st) != nil {
		return 0
	}
	return st.Ino
}
