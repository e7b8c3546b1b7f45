package agent

import (
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// TestAgentAnnotationCRI drives a private containerd over CRI as the kubelet
// would (internal/testprog/kube, shared with internal/podfind's containerd
// test): two pods in one namespace, only one annotated memprof.io/profile:
// "true". The agent, with no --namespace, must profile the annotated pod's
// container (named from CRI) and leave the other alone.
func TestAgentAnnotationCRI(t *testing.T) {
	testprog.RequireRoot(t)
	pauseBin := testprog.Build(t, "k8s_pause.c", "-static")
	workBin := testprog.Build(t, "agent_workload.c")

	cd := kube.StartContainerd(t, "agentcri")
	sock := cd.Sock
	files := map[string]string{"/pause": pauseBin, "/agent_workload": workBin}
	for _, lib := range kube.Libs(t, workBin) {
		files[lib] = lib
	}
	cd.ImportImage(t, files, "/pause")
	logs := filepath.Join(cd.Dir, "pods")
	ns := "shop"

	// runPod starts a sandbox and one container "app" running the leaker.
	runPod := func(name string, annotations map[string]string) (pid int) {
		sb := cd.RunPodSandbox(t, kube.Pod{Namespace: ns, Name: name, UID: newUID()}, logs, annotations)
		_, pid = cd.StartContainer(t, sb, "app", []string{"/agent_workload", "leak", strconv.Itoa(8 << 20), strconv.Itoa(64 << 10)})
		return pid
	}

	a, _, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs, CRISockets: []string{sock}},
		SampleRate:       64 << 10,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
	})
	wanted := runPod("annotated", map[string]string{AnnotationProfile: "true"})
	plain := runPod("plain", nil)
	waitFor(t, 20*time.Second, "the agent to profile the annotated pod", func() bool {
		c := findContainer(a, ns, "annotated")
		return c != nil && c.Processes >= 1
	})
	syscall.Kill(wanted, syscall.SIGUSR1)
	syscall.Kill(plain, syscall.SIGUSR1)
	waitFor(t, 10*time.Second, "the annotated pod's live heap", func() bool {
		c := findContainer(a, ns, "annotated")
		return c != nil && c.LiveHeap > 4<<20
	})
	time.Sleep(time.Second)
	c := findContainer(a, ns, "annotated")
	t.Logf("annotated pod: container %q pids %v, live heap %.1f MiB (8 MiB leaked)", c.Container, c.Pids, c.LiveHeap/(1<<20))
	if c.Container != "app" || !within(c.LiveHeap, 8<<20, 0.25) {
		t.Errorf("annotated pod: container %q live heap %.0f, want app with 8 MiB ±25%%", c.Container, c.LiveHeap)
	}
	if p := findContainer(a, ns, "plain"); p != nil {
		t.Errorf("the pod without the annotation is profiled: %+v", p)
	}
	if _, ok := a.s.Targets()[plain]; ok {
		t.Errorf("probes attached to the unannotated pod's process %d", plain)
	}
}
