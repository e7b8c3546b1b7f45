// Package podfind discovers the Kubernetes containers running on this node
// without asking the API server: it walks the kubelet's cgroups (v1 memory
// hierarchy and/or the v2 tree, under the cgroupfs or the systemd driver),
// groups processes by container, and names them from the container runtime's
// CRI socket when one answers, else from the kubelet's pod log directories.
//
// What can be attributed without a CRI socket:
//   - pod UID, QoS class, container ID and pids: always, from the cgroup path;
//   - namespace and pod name: when /var/log/pods/<ns>_<pod>_<uid>/ exists;
//   - container name: from the kubelet's termination-log bind mount seen in
//     /proc/PID/mountinfo (…/pods/<uid>/containers/<name>/…), which every
//     container has unless its terminationMessagePath is empty; else from a
//     log symlink naming the container id (dockershim / cri-dockerd write
//     N.log -> …/<id>/<id>-json.log); else when the pod's log directory has a
//     single container directory and the pod has a single running container.
//     A pod with several containers (or init containers) whose processes have
//     no termination-log mount leaves Name "" for its containers.
//   - the pod sandbox ("pause") is left out: by sandbox id when CRI answers,
//     else when every process of the cgroup is named "pause".
//   - pod annotations: only from CRI.
package podfind

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/memprof/memprof/internal/cgroups"
)

// Paths says where the host's files are; an agent in a container points them
// at its host mounts (e.g. ProcRoot "/host/proc").
type Paths struct {
	CgroupRoot string   // "/sys/fs/cgroup"
	ProcRoot   string   // "/proc"
	PodLogs    string   // "/var/log/pods"
	CRISockets []string // tried in order; absent sockets are skipped
}

// DefaultPaths are the host paths of a standard node.
func DefaultPaths() Paths {
	return Paths{
		CgroupRoot: "/sys/fs/cgroup",
		ProcRoot:   "/proc",
		PodLogs:    "/var/log/pods",
		CRISockets: []string{
			"/run/containerd/containerd.sock",
			"/run/crio/crio.sock",
			"/var/run/cri-dockerd.sock",
		},
	}
}

// Container is one running Kubernetes container on this node.
type Container struct {
	Namespace, Pod, PodUID, Name, ID, Runtime, QoS string
	CgroupV1Memory                                 string // absolute directory in the v1 memory hierarchy, or ""
	// NoV1Memory: the host has a v1 memory hierarchy but the container
	// has no directory in it (yet: a runtime makes one hierarchy's
	// directory after the other, and event-driven discovery can run in
	// between).
	NoV1Memory  bool
	CgroupV2    string // absolute directory in the v2 tree, or ""
	Pids        []int  // sorted
	Annotations map[string]string
	Source      string // where Namespace/Pod/Name came from: "cri", "pod-logs" or "cgroup"
}

// Sources of a Container's metadata.
const (
	SourceCRI     = "cri"
	SourcePodLogs = "pod-logs"
	SourceCgroup  = "cgroup"
)

// ErrPartial marks an error returned together with usable containers: a CRI
// socket existed but did not answer, so names came from the fallbacks.
var ErrPartial = errors.New("pod discovery degraded")

// Discover lists the Kubernetes containers on this node. When it returns an
// error that wraps ErrPartial the containers are still valid (metadata came
// from the pod log fallback); any other error means nothing was found.
func Discover(ctx context.Context, p Paths) ([]Container, error) {
	v1, v2 := cgroupTrees(p.CgroupRoot)
	if v1 == "" && v2 == "" {
		return nil, fmt.Errorf("no cgroup v1 memory hierarchy at %s and no cgroup v2 tree at %s or %s: mount the host's /sys/fs/cgroup into the agent (hostPath) and pass its path",
			filepath.Join(p.CgroupRoot, "memory"), p.CgroupRoot, filepath.Join(p.CgroupRoot, "unified"))
	}
	byID := map[string]*Container{}
	var order []string
	add := func(root string, v2tree bool) error {
		if root == "" {
			return nil
		}
		return walkTree(root, func(dir, rel string, podUID, id, runtime, qos string, pids []int) {
			c := byID[id]
			if c == nil {
				c = &Container{ID: id, PodUID: podUID, Runtime: runtime, QoS: qos, Source: SourceCgroup}
				byID[id] = c
				order = append(order, id)
			}
			if v2tree {
				c.CgroupV2 = dir
			} else {
				c.CgroupV1Memory = dir
			}
			c.Pids = mergePids(c.Pids, pids)
		})
	}
	if err := add(v1, false); err != nil {
		return nil, err
	}
	if err := add(v2, true); err != nil {
		return nil, err
	}
	if v1 != "" {
		for _, c := range byID {
			c.NoV1Memory = c.CgroupV1Memory == ""
		}
	}

	var partial error
	invs, criErr := queryAllCRI(ctx, p.CRISockets)
	if criErr != nil {
		partial = fmt.Errorf("%w: %w; names fall back to %s", ErrPartial, criErr, p.PodLogs)
	}
	sandboxes := map[string]bool{}
	known := map[string]CRIContainer{}
	for _, inv := range invs {
		for id := range inv.Sandboxes {
			sandboxes[id] = true
		}
		for id, c := range inv.Containers {
			known[id] = c
		}
	}

	var out []*Container
	for _, id := range order {
		c := byID[id]
		if sandboxes[id] {
			continue
		}
		if k, ok := known[id]; ok {
			c.Namespace, c.Pod, c.Name, c.Annotations, c.Source = k.Namespace, k.Pod, k.Name, k.Annotations, SourceCRI
			if k.PodUID != "" {
				c.PodUID = k.PodUID
			}
			if c.Runtime == "" {
				c.Runtime = k.Runtime
			}
			out = append(out, c)
			continue
		}
		if len(invs) == 0 && seen.pause(p.ProcRoot+"\x00"+id, c.Pids, func() bool { return isPause(p.ProcRoot, c.Pids) }) {
			continue
		}
		out = append(out, c)
	}

	// Fallback for containers CRI did not name.
	logs := readPodLogs(p.PodLogs)
	perPod := map[string]int{}
	for _, c := range out {
		if c.Source != SourceCRI {
			perPod[c.PodUID]++
		}
	}
	for _, c := range out {
		if c.Source == SourceCRI {
			continue
		}
		pl, haveLogs := logs[c.PodUID]
		if haveLogs {
			c.Namespace, c.Pod, c.Source = pl.namespace, pl.pod, SourcePodLogs
			if n, ok := pl.byID[c.ID]; ok {
				c.Name = n
			}
		}
		if c.Name == "" {
			c.Name = seen.name(p.ProcRoot+"\x00"+c.ID, c.Pids, func() string { return nameFromMountinfo(p.ProcRoot, c.PodUID, c.Pids) })
		}
		if c.Name == "" && haveLogs && len(pl.containers) == 1 && perPod[c.PodUID] == 1 {
			c.Name = pl.containers[0]
		}
	}

	seen.keep(p.ProcRoot, byID)

	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		if a.Pod != b.Pod {
			return a.Pod < b.Pod
		}
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		return a.ID < b.ID
	})
	res := make([]Container, len(out))
	for i, c := range out {
		res[i] = *c
	}
	return res, partial
}

// cgroupTrees finds the v1 memory hierarchy and the v2 tree under root: pure
// v2 has cgroup.controllers at root itself, hybrid has it at root/unified.
func cgroupTrees(root string) (v1mem, v2 string) {
	if exists(filepath.Join(root, "memory", "memory.usage_in_bytes")) {
		v1mem = filepath.Join(root, "memory")
	}
	switch {
	case exists(filepath.Join(root, "cgroup.controllers")):
		v2 = root
	case exists(filepath.Join(root, "unified", "cgroup.controllers")):
		v2 = filepath.Join(root, "unified")
	}
	return
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// walkTree visits the kubelet's part of one cgroup tree and calls found for
// each container cgroup with the pids of it and its descendants. Outside a
// "kubepods" path it descends only a few levels (enough for a kubelet
// --cgroup-root such as /kubelet.slice or a kind node's /docker/<id>/...).
func walkTree(root string, found func(dir, rel, podUID, id, runtime, qos string, pids []int)) error {
	if _, err := os.ReadDir(root); err != nil {
		return fmt.Errorf("read cgroup tree %s: %w (the agent needs the host's /sys/fs/cgroup mounted and read access)", root, err)
	}
	var walk func(dir, rel string, depth int)
	walk = func(dir, rel string, depth int) {
		if rel != "" {
			n, uid, id, rt, qos, ok := parseCgroupPath(rel)
			if ok {
				if n == len(strings.Split(rel, "/")) {
					found(dir, rel, uid, id, rt, qos, readPidsRecursive(dir))
				}
				return
			}
			if !strings.Contains(rel, "kubepods") && depth >= 4 {
				return
			}
		}
		ents, err := os.ReadDir(dir)
		if err != nil {
			return // a cgroup removed while we walk
		}
		for _, e := range ents {
			if e.IsDir() {
				walk(filepath.Join(dir, e.Name()), path(rel, e.Name()), depth+1)
			}
		}
	}
	walk(root, "", 0)
	return nil
}

func path(rel, name string) string {
	if rel == "" {
		return name
	}
	return rel + "/" + name
}

// readPidsRecursive lists the processes of a container's cgroup and its
// sub-cgroups, sorted (none if it vanished while being read).
func readPidsRecursive(dir string) []int {
	pids, err := cgroups.Procs(dir, true)
	if err != nil {
		return nil
	}
	return mergePids(pids, nil)
}

func mergePids(a, b []int) []int {
	seen := make(map[int]bool, len(a)+len(b))
	var out []int
	for _, l := range [][]int{a, b} {
		for _, p := range l {
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	sort.Ints(out)
	return out
}

func comm(procRoot string, pid int) string {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "comm"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// isPause reports whether every process of a cgroup is the sandbox's pause.
func isPause(procRoot string, pids []int) bool {
	if len(pids) == 0 {
		return false
	}
	for _, p := range pids {
		if comm(procRoot, p) != "pause" {
			return false
		}
	}
	return true
}

type podLogDir struct {
	namespace, pod string
	containers     []string          // container directory names, sorted
	byID           map[string]string // container id -> name, from log symlinks
}

var hex64Re = regexp.MustCompile(`[0-9a-f]{64}`)

// readPodLogs reads /var/log/pods/<ns>_<pod>_<uid>/<container>/N.log. Neither
// namespace nor pod names may contain '_', so the split is unambiguous.
func readPodLogs(dir string) map[string]podLogDir {
	out := map[string]podLogDir{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return out
	}
	for _, e := range ents {
		parts := strings.Split(e.Name(), "_")
		if !e.IsDir() || len(parts) != 3 {
			continue
		}
		pl := podLogDir{namespace: parts[0], pod: parts[1], byID: map[string]string{}}
		cents, _ := os.ReadDir(filepath.Join(dir, e.Name()))
		for _, ce := range cents {
			if !ce.IsDir() {
				continue
			}
			pl.containers = append(pl.containers, ce.Name())
			logs, _ := os.ReadDir(filepath.Join(dir, e.Name(), ce.Name()))
			for _, l := range logs {
				if !strings.HasSuffix(l.Name(), ".log") {
					continue
				}
				target, err := os.Readlink(filepath.Join(dir, e.Name(), ce.Name(), l.Name()))
				if err != nil {
					continue
				}
				if id := hex64Re.FindString(target); id != "" {
					pl.byID[id] = ce.Name()
				}
			}
		}
		sort.Strings(pl.containers)
		out[parts[2]] = pl
	}
	return out
}

// nameFromMountinfo finds the kubelet's termination-log bind mount, whose
// source is <kubelet root>/pods/<uid>/containers/<name>/<random>.
func nameFromMountinfo(procRoot, podUID string, pids []int) string {
	if podUID == "" {
		return ""
	}
	needle := "/pods/" + podUID + "/containers/"
	for _, pid := range pids {
		f, err := os.Open(filepath.Join(procRoot, strconv.Itoa(pid), "mountinfo"))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 5 {
				continue
			}
			root := unescapeMountinfo(fields[3])
			i := strings.Index(root, needle)
			if i < 0 {
				continue
			}
			rest := root[i+len(needle):]
			if j := strings.IndexByte(rest, '/'); j > 0 {
				f.Close()
				return rest[:j]
			}
		}
		f.Close()
	}
	return ""
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for space etc.).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// seen caches what Discover learns of a container from its processes'
// files (the name from mountinfo, whether it is the pause sandbox), so a
// discovery every few seconds reads them once per container, not every
// time: a container's mounts and program do not change while the same
// processes run. An answer is read again when the container's first
// process changes (a restart); a name not found is looked for again after
// retryUnnamed (read while runc's init was still setting up the mounts?).
// Containers gone from a discovery are forgotten.
var seen = &procCache{m: map[string]procFacts{}}

const retryUnnamed = time.Minute

type procCache struct {
	mu sync.Mutex
	m  map[string]procFacts // by proc root + "\x00" + container id
}

type procFacts struct {
	first     int // the first pid when read (0: none)
	name      string
	nameAt    time.Time // when name was read (zero: not read)
	isPause   bool
	pauseRead bool
}

func firstPid(pids []int) int {
	if len(pids) == 0 {
		return 0
	}
	return pids[0]
}

// name returns the container's name from read, cached while its first
// process stays the same (nothing is cached for a container with none).
func (c *procCache) name(key string, pids []int, read func() string) string {
	first := firstPid(pids)
	c.mu.Lock()
	f, ok := c.m[key]
	c.mu.Unlock()
	if ok && !f.nameAt.IsZero() && f.first == first && first != 0 &&
		(f.name != "" || time.Since(f.nameAt) < retryUnnamed) {
		return f.name
	}
	n := read()
	if first != 0 {
		c.mu.Lock()
		f = c.m[key]
		if f.first != first {
			f = procFacts{first: first}
		}
		f.name, f.nameAt = n, time.Now()
		c.m[key] = f
		c.mu.Unlock()
	}
	return n
}

// pause returns whether the container is the pause sandbox, cached as name.
func (c *procCache) pause(key string, pids []int, read func() bool) bool {
	first := firstPid(pids)
	c.mu.Lock()
	f, ok := c.m[key]
	c.mu.Unlock()
	if ok && f.pauseRead && f.first == first && first != 0 {
		return f.isPause
	}
	v := read()
	if first != 0 {
		c.mu.Lock()
		f = c.m[key]
		if f.first != first {
			f = procFacts{first: first}
		}
		f.isPause, f.pauseRead = v, true
		c.m[key] = f
		c.mu.Unlock()
	}
	return v
}

// keep forgets the containers under procRoot that are not in ids.
func (c *procCache) keep(procRoot string, ids map[string]*Container) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for key := range c.m {
		root, id, _ := strings.Cut(key, "\x00")
		if _, ok := ids[id]; !ok && root == procRoot {
			delete(c.m, key)
		}
	}
}
