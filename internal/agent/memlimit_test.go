package agent

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/memprof/memprof/deploy"
)

// Bounds of the agent's Go heap in TestAgentHostileContainer, where it
// profiles two containers of agent_workload (a small C program) linking
// libc, whose DWARF line tables it reads from libc6-dbg's debug file.
const (
	// heapLiveMax bounds what the agent retains (live after GC at the end,
	// less before the agent started): the symbols and line tables of the
	// binary and libc, 15-17 MiB measured; twice that. A hostile object
	// that made the agent keep or pile up state (blocked opens, retries,
	// buffers) would add to it every discovery round.
	heapLiveMax = 32 << 20
	// heapPeakMax bounds the Go heap in use at its peak (sampled every
	// 200 ms), parse garbage included: 61-67 MiB measured; GOGC=100 lets
	// the heap reach twice the live size. A quarter of the DaemonSet's
	// 512 MiB limit, which also holds ~143 MiB of BPF maps.
	heapPeakMax = 128 << 20
)

// daemonSetMemoryLimit is the agent container's memory limit in the
// shipped DaemonSet (deploy/daemonset.yaml), in bytes: the memcg limit
// above which the kernel OOM-kills the agent on a node.
func daemonSetMemoryLimit(t *testing.T) int64 {
	t.Helper()
	b, err := deploy.Manifests.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatalf("deploy/daemonset.yaml: %v", err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if q, ok := c.Resources.Limits["memory"]; ok {
			return q.Value()
		}
	}
	t.Fatal("deploy/daemonset.yaml: no container with a memory limit")
	return 0
}

// memWatch follows the memory of the test process, which runs the agent:
// the Go heap in use (runtime.MemStats.HeapInuse, sampled), the peak RSS
// (VmHWM of /proc/self/status, reset when the watch starts by writing 5
// to /proc/self/clear_refs, see proc(5)) and the kernel memory of the BPF
// maps the process holds (the memlock field of each map's fdinfo; charged
// to the memcg of the process that created the map since Linux 5.11).
// Peak RSS plus BPF maps is what the agent's container memcg would be
// charged beyond reclaimable page cache; it over-counts the agent by the
// test binary's own memory.
type memWatch struct {
	heap0    uint64 // HeapInuse at the start, after a GC
	live0    uint64 // HeapAlloc at the start, after a GC
	peakHeap atomic.Uint64
}

func startMemWatch(t *testing.T) *memWatch {
	t.Helper()
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		t.Fatalf("reset the peak RSS: %v", err)
	}
	w := &memWatch{heap0: ms.HeapInuse, live0: ms.HeapAlloc}
	w.peakHeap.Store(ms.HeapInuse)
	return w
}

// sample records the Go heap in use now (a short stop of the world).
func (w *memWatch) sample() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	for {
		p := w.peakHeap.Load()
		if ms.HeapInuse <= p || w.peakHeap.CompareAndSwap(p, ms.HeapInuse) {
			return
		}
	}
}

// peakRSS is VmHWM of the test process in bytes.
func peakRSS(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			var kb int64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb); err != nil {
				t.Fatalf("VmHWM %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/self/status")
	return 0
}

// bpfMapMemory sums the memlock (bytes) of the BPF maps the test process
// holds open.
func bpfMapMemory() int64 {
	ents, _ := os.ReadDir("/proc/self/fd")
	var sum int64
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:bpf-map" {
			continue
		}
		b, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "memlock:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				sum += n
			}
		}
	}
	return sum
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
