package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
	"github.com/memprof/memprof/pprofout"
)

// TestAgentRSS: containers that are not selected for allocator probes (no
// annotation, namespace not listed) get RSS profiles whose stacks hold the
// known leak, RSS metrics, and an RSS post-mortem when OOM-killed; an
// allocation-heavy container stays followed (no budget in this tier).
func TestAgentRSS(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "agent_workload.c")
	root := kube.Rootfs(t, bin)
	fsRoot := "memprof-agent-rss-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpr-" + randHex(6)
	data := t.TempDir()
	a, _, _ := startAgent(t, Config{
		Paths:             podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:        []string{"not-" + ns}, // nothing of ns is selected for allocator probes
		DataDir:           data,
		ProfileInterval:   time.Second,
		Retention:         time.Hour,
		SampleRate:        sampleRate,
		DiscoverInterval:  300 * time.Millisecond,
		CollectInterval:   500 * time.Millisecond,
		MaxCallsPerSecond: 1000,
	})
	base := "http://" + a.Addr()

	leaky := kube.Pod{Namespace: ns, Name: "leaky", UID: newUID()}
	lc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: leaky, Name: "app", Rootfs: root, Logs: logs, Args: []string{"/agent_workload", "leak", fmt.Sprint(leakTotal), fmt.Sprint(leakBlock)}})
	hot := kube.Pod{Namespace: ns, Name: "hot", UID: newUID()}
	kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: hot, Name: "spin", Rootfs: root, Logs: logs, Args: []string{"/agent_workload", "hot"}})
	waitFor(t, 10*time.Second, "the container to start", func() bool { return strings.Contains(lc.Output(), "waiting") })
	waitFor(t, 15*time.Second, "the RSS tier to follow both containers", func() bool {
		n := 0
		for _, c := range a.RSSProfiled() {
			if strings.HasPrefix(c, ns+"/") {
				n++
			}
		}
		return n == 2
	})
	if err := syscall.Kill(lc.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the container to leak", func() bool { return strings.Contains(lc.Output(), "leaked") })
	dir := filepath.Join(data, "profiles", ns+"_leaky_app")
	var newest string
	waitFor(t, 15*time.Second, "an RSS profile of the leaky container after the leak", func() bool {
		ents, _ := filepath.Glob(filepath.Join(dir, "*.rss.pb.gz"))
		for _, e := range ents {
			st, err := os.Stat(e)
			if err == nil && st.ModTime().After(time.Now().Add(-1500*time.Millisecond)) {
				newest = e
			}
		}
		return newest != ""
	})
	p, err := pprofout.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	var inLeak int64
	for _, s := range p.Sample {
		for _, loc := range s.Location {
			for _, ln := range loc.Line {
				if ln.Function != nil && ln.Function.Name == "agent_leak_known" {
					inLeak += s.Value[2]
				}
			}
		}
		if s.Label["pod"][0] != "leaky" || s.Label["namespace"][0] != ns {
			t.Errorf("RSS sample labels %v, want the leaky pod's", s.Label)
			break
		}
	}
	t.Logf("RSS profile %s: agent_leak_known %.1f MiB rss_space (truth %d MiB)", filepath.Base(newest), float64(inLeak)/(1<<20), leakTotal>>20)
	// 32 MiB in 4 KiB pages at the 64 KiB rate: sd ~1.4 MiB.
	if !within(float64(inLeak), leakTotal, 0.2) {
		t.Errorf("agent_leak_known rss_space %d, want %d ±20%%", inLeak, leakTotal)
	}
	_, b := get(t, base+"/metrics", "")
	v, ok := metric(string(b), MetricRSSSampled, map[string]string{"namespace": ns, "pod": "leaky"})
	t.Logf("%s = %.1f MiB", MetricRSSSampled, v/(1<<20))
	if !ok || v < 0.8*leakTotal {
		t.Errorf("%s = %v (present %t), want about %d", MetricRSSSampled, v, ok, leakTotal)
	}
	// 64 KiB blocks come from glibc's brk heap (below the mmap threshold).
	brk, ok := metric(string(b), MetricRSSRegion, map[string]string{"namespace": ns, "pod": "leaky", "region": "brk"})
	t.Logf("%s{region=brk} = %.1f MiB", MetricRSSRegion, brk/(1<<20))
	if !ok || brk < 0.8*leakTotal {
		t.Errorf("%s{region=brk} = %v (present %t), want about %d", MetricRSSRegion, brk, ok, leakTotal)
	}

	// OOM kill of a container that is not selected for allocator probes
	oomPod := kube.Pod{Namespace: ns, Name: "oomer", UID: newUID()}
	oc := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: oomPod, Name: "hog", Rootfs: root, Logs: logs, MemLimit: oomLimit, Args: []string{"/agent_workload", "oom", fmt.Sprint(1 << 20)}})
	waitFor(t, 10*time.Second, "the oom container to start", func() bool { return strings.Contains(oc.Output(), "waiting") })
	waitFor(t, 15*time.Second, "the RSS tier to follow the oom container", func() bool {
		for _, c := range a.RSSProfiled() {
			if c == ns+"/oomer/hog" {
				return true
			}
		}
		return false
	})
	if err := syscall.Kill(oc.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var pm string
	waitFor(t, 30*time.Second, "the RSS post-mortem", func() bool {
		ents, _ := filepath.Glob(filepath.Join(data, "oom", "*agent_workload*.rss.pb.gz"))
		if len(ents) > 0 {
			pm = ents[0]
		}
		return pm != ""
	})
	op, err := pprofout.ReadFile(pm)
	if err != nil {
		t.Fatal(err)
	}
	top, err := pprofout.Top(op, pprofout.RSSSpace, 1)
	if err != nil || len(top) == 0 {
		t.Fatalf("post-mortem top: %v", err)
	}
	t.Logf("RSS post-mortem %s: top %s %.1f MiB (limit %d MiB)", filepath.Base(pm), strings.Join(top[0].Frames[:min(2, len(top[0].Frames))], " < "), float64(top[0].Value)/(1<<20), oomLimit>>20)
	found := false
	for _, f := range top[0].Frames {
		if strings.HasPrefix(f, "agent_oom_grow") {
			found = true
		}
	}
	if !found || float64(top[0].Value) < 0.5*oomLimit {
		t.Errorf("post-mortem top stack %v %d bytes, want agent_oom_grow holding most of %d", top[0].Frames, top[0].Value, oomLimit)
	}

	// the allocation-heavy container is still followed (no budget here)
	hotFollowed := false
	for _, c := range a.RSSProfiled() {
		if c == ns+"/hot/spin" {
			hotFollowed = true
		}
	}
	if !hotFollowed {
		t.Errorf("the allocation-heavy container is no longer followed by the RSS tier")
	}
}
