package cgroups

import (
	"bufio"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3/cgroup1"
	v1stats "github.com/containerd/cgroups/v3/cgroup1/stats"
	"github.com/containerd/cgroups/v3/cgroup2"
	"golang.org/x/sys/unix"
)

// Stats is the memory state of one cgroup, in bytes, with the same meaning on
// v1 and v2 (v2 names; v1 values are the hierarchical total_* ones).
type Stats struct {
	Version      int    // 1 or 2
	Path         string // absolute cgroup directory
	Limit        uint64 // memory.limit_in_bytes / memory.max; 0 = unlimited
	Usage        uint64 // memory.usage_in_bytes / memory.current
	MaxUsage     uint64 // peak usage: v1 memory.max_usage_in_bytes, v2 memory.peak (5.19+, else 0)
	Anon         uint64 // anonymous memory (v1 total_rss, v2 anon)
	File         uint64 // page cache including shmem (v1 total_cache, v2 file)
	Kernel       uint64 // kernel memory (v1 memory.kmem.usage_in_bytes, v2 kernel)
	Shmem        uint64 // tmpfs/shared memory, part of File
	Sock         uint64 // socket buffers (v1 memory.kmem.tcp.usage_in_bytes, v2 sock)
	InactiveFile uint64
	// WorkingSet is Usage - InactiveFile (floor 0), as kubelet computes the
	// container_memory_working_set_bytes it evicts on.
	WorkingSet uint64
	OOMKills   uint64 // processes OOM-killed in this cgroup (v1 oom_control oom_kill, v2 memory.events oom_kill)
	Failcnt    uint64 // times a charge hit the limit (v1 memory.failcnt + memory.memsw.failcnt, v2 memory.events max)
	// Ancestor is the nearest ancestor that has a limit, read the same way,
	// when this cgroup itself has none (nil otherwise, or when no ancestor is
	// limited). An OOM caused by an ancestor's limit shows in its counters.
	Ancestor *Stats `json:",omitempty"`
}

// ReadStats reads the memory statistics of the cgroup directory dir, a v1
// memory controller directory or a v2 directory. It fails with an error naming
// dir when the cgroup is removed before or while it is read.
func ReadStats(dir string) (*Stats, error) {
	st, err := readStats(dir)
	if err != nil {
		return nil, err
	}
	if st.Limit == 0 {
		st.Ancestor = limitedAncestor(dir, st.Version)
	}
	return st, nil
}

func readStats(dir string) (*Stats, error) {
	dir = filepath.Clean(dir)
	ver, err := Version(dir)
	if err != nil {
		if _, serr := os.Stat(dir); serr != nil {
			return nil, fmt.Errorf("cgroup %s does not exist (removed: its processes exited or the container was deleted): %w", dir, serr)
		}
		return nil, err
	}
	var st *Stats
	if ver == 1 {
		st, err = readV1(dir)
	} else {
		st, err = readV2(dir)
	}
	if err != nil {
		if _, serr := os.Stat(dir); serr != nil || isGone(err) {
			return nil, fmt.Errorf("cgroup %s vanished while its memory statistics were read (its processes exited or the container was deleted): %w", dir, err)
		}
		return nil, err
	}
	// A value read from a file of a cgroup removed halfway is not trusted.
	if _, serr := os.Stat(filepath.Join(dir, "cgroup.procs")); serr != nil {
		return nil, fmt.Errorf("cgroup %s vanished while its memory statistics were read (its processes exited or the container was deleted): %w", dir, serr)
	}
	st.WorkingSet = 0
	if st.Usage > st.InactiveFile {
		st.WorkingSet = st.Usage - st.InactiveFile
	}
	return st, nil
}

// readV1 reads a v1 memory controller directory.
func readV1(dir string) (*Stats, error) {
	// cgroup1's controller joins <root>/memory/<path>; with root = dir and
	// path = ".." the result is dir itself, wherever the hierarchy is mounted.
	var ignore []string
	for _, mod := range []string{"memsw", "kmem", "kmem.tcp"} {
		if _, err := os.Stat(filepath.Join(dir, "memory."+mod+".usage_in_bytes")); err != nil {
			ignore = append(ignore, mod)
		}
	}
	mc := cgroup1.NewMemory(dir, cgroup1.IgnoreModules(ignore...))
	var m v1stats.Metrics
	if err := mc.Stat("..", &m); err != nil {
		return nil, fmt.Errorf("read v1 memory statistics of cgroup %s: %w", dir, err)
	}
	raw, err := readKV(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return nil, err
	}
	mem := m.Memory
	st := &Stats{
		Version:      1,
		Path:         dir,
		Usage:        mem.Usage.Usage,
		MaxUsage:     mem.Usage.Max,
		Anon:         mem.TotalRSS,
		File:         mem.TotalCache,
		Shmem:        raw["total_shmem"],
		InactiveFile: mem.TotalInactiveFile,
		Failcnt:      mem.Usage.Failcnt,
	}
	if !unlimited(mem.Usage.Limit) {
		st.Limit = mem.Usage.Limit
	}
	if mem.Swap != nil {
		// With memory.memsw.limit_in_bytes set, a charge may fail on the
		// memory+swap counter first; count its failures too.
		st.Failcnt += mem.Swap.Failcnt
	}
	if mem.Kernel != nil {
		st.Kernel = mem.Kernel.Usage
	}
	if mem.KernelTCP != nil {
		st.Sock = mem.KernelTCP.Usage
	}
	if m.MemoryOomControl != nil {
		st.OOMKills = m.MemoryOomControl.OomKill
	}
	return st, nil
}

// readV2 reads a v2 directory. It fails when the memory controller is not
// enabled there (as on hybrid hosts, whose v2 tree has no controllers).
func readV2(dir string) (*Stats, error) {
	if _, err := os.Stat(filepath.Join(dir, "memory.stat")); err != nil {
		if _, derr := os.Stat(dir); derr != nil {
			return nil, err
		}
		return nil, fmt.Errorf("cgroup v2 directory %s has no memory controller (no memory.stat): on a hybrid host read the process's v1 memory cgroup under %s/memory instead, on a pure v2 host enable it with +memory in the parent's cgroup.subtree_control", dir, Base)
	}
	mount, group := v2Split(dir)
	mgr, err := cgroup2.Load(group, cgroup2.WithMountpoint(mount))
	if err != nil {
		return nil, fmt.Errorf("open v2 cgroup %s: %w", dir, err)
	}
	m, err := mgr.StatFiltered(cgroup2.StatMemory | cgroup2.StatMemoryEvents)
	if err != nil {
		return nil, fmt.Errorf("read v2 memory statistics of cgroup %s: %w", dir, err)
	}
	// The library maps unreadable single-value files to 0; read the limit
	// and usage ourselves so a vanished cgroup is an error, not a zero.
	limit, err := readLimitV2(dir)
	if err != nil {
		return nil, err
	}
	usage, err := readUint(filepath.Join(dir, "memory.current"))
	if err != nil {
		return nil, err
	}
	raw, err := readKV(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return nil, err
	}
	mem := m.Memory
	st := &Stats{
		Version:      2,
		Path:         dir,
		Limit:        limit,
		Usage:        usage,
		MaxUsage:     mem.MaxUsage,
		Anon:         mem.Anon,
		File:         mem.File,
		Shmem:        mem.Shmem,
		Sock:         mem.Sock,
		InactiveFile: mem.InactiveFile,
		Kernel:       raw["kernel"],
	}
	if st.Kernel == 0 { // kernels before 5.18 have no "kernel" key
		st.Kernel = raw["kernel_stack"] + raw["slab"] + raw["pagetables"] + raw["percpu"]
	}
	if ev := m.MemoryEvents; ev != nil {
		st.OOMKills = ev.OomKill
		st.Failcnt = ev.Max
	}
	return st, nil
}

// v2Split splits an absolute v2 directory into the mount point and the group
// path below it, as cgroup2.Load wants them.
func v2Split(dir string) (mount, group string) {
	mount = dir
	for mount != "/" && !isRootCgroup(mount) {
		mount = filepath.Dir(mount)
	}
	rel, _ := filepath.Rel(mount, dir)
	return mount, "/" + strings.TrimPrefix(filepath.ToSlash(rel), ".")
}

// isRootCgroup reports whether dir is the root of a cgroup hierarchy: the
// parent is on another file system.
func isRootCgroup(dir string) bool {
	var a, b unix.Stat_t
	if unix.Stat(dir, &a) != nil || unix.Stat(filepath.Dir(dir), &b) != nil {
		return true
	}
	return a.Dev != b.Dev
}

// limitedAncestor returns the stats of the nearest ancestor of dir that has a
// memory limit, or nil. Only the limit file of each ancestor is read on the
// way up; all the statistics are read of the limited one alone.
func limitedAncestor(dir string, version int) *Stats {
	for d := filepath.Dir(filepath.Clean(dir)); d != "/" && d != "."; d = filepath.Dir(d) {
		if v, err := Version(d); err != nil || v != version {
			return nil
		}
		limited, err := hasLimit(d, version)
		if err != nil {
			return nil // the hierarchy root (no limit file) or removed
		}
		if limited {
			st, err := readStats(d)
			if err != nil || st.Limit == 0 {
				return nil
			}
			return st
		}
		if isRootCgroup(d) {
			return nil
		}
	}
	return nil
}

// hasLimit reads the memory limit file of a v1 or v2 directory.
func hasLimit(dir string, version int) (bool, error) {
	if version == 2 {
		v, err := readLimitV2(dir)
		return v != 0, err
	}
	v, err := readUint(filepath.Join(dir, "memory.limit_in_bytes"))
	return !unlimited(v), err
}

// readLimitV2 reads memory.max; 0 means no limit ("max").
func readLimitV2(dir string) (uint64, error) {
	v, err := readUint(filepath.Join(dir, "memory.max"))
	if v == math.MaxUint64 {
		v = 0
	}
	return v, err
}

// readUint reads a one-number cgroup file; "max" reads as 0 (unlimited).
func readUint(p string) (uint64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", p, err)
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s (%q): %w", p, s, err)
	}
	return v, nil
}

// readKV reads a "key value" per line file such as memory.stat.
func readKV(p string) (map[string]uint64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	out := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		if v, err := strconv.ParseUint(f[1], 10, 64); err == nil {
			out[f[0]] = v
		}
	}
	return out, nil
}
