package podfind

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/memprof/memprof/internal/testprog"
)

// TestDiscoverKubeletLayouts lays out real cgroups exactly as the kubelet does
// (under a test-unique --cgroup-root), with both drivers, in the v1 memory
// hierarchy and in the v2 tree, moves real processes into them, writes a
// kubelet pod log tree, and checks that Discover names every container.
func TestDiscoverKubeletLayouts(t *testing.T) {
	testprog.RequireRoot(t)
	v1, v2 := cgroupTrees("/sys/fs/cgroup")
	if v1 == "" || v2 == "" {
		t.Fatalf("this test needs the hybrid layout of the CI machines (v1 memory at /sys/fs/cgroup/memory and a v2 tree at /sys/fs/cgroup or /sys/fs/cgroup/unified); found v1=%q v2=%q", v1, v2)
	}
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatalf("need sleep(1) from coreutils: %v", err)
	}
	// a copy of sleep named "pause" stands for the pod sandbox
	pause := filepath.Join(t.TempDir(), "pause")
	b, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pause, b, 0o755); err != nil {
		t.Fatal(err)
	}

	tag := randHex(8)
	fsRoot := "memprof-podfind-" + tag // cgroupfs driver, --cgroup-root
	sdRoot := "memprofpf" + tag        // systemd driver, --cgroup-root
	uidA, uidB, uidC, uidD := newUID(), newUID(), newUID(), newUID()
	a0, a1, a2, b1, c1, d1 := newID(), newID(), newID(), newID(), newID(), newID()
	under := func(s string) string { return strings.ReplaceAll(s, "-", "_") }

	rel := map[string]string{
		// pod A shop/web: cgroupfs, Burstable, sandbox + 2 containers, v1 and v2
		a0: fsRoot + "/kubepods/burstable/pod" + uidA + "/" + a0,
		a1: fsRoot + "/kubepods/burstable/pod" + uidA + "/" + a1,
		a2: fsRoot + "/kubepods/burstable/pod" + uidA + "/" + a2,
		// pod B shop/db: systemd, Guaranteed (directly under kubepods), v1 only
		b1: sdRoot + ".slice/" + sdRoot + "-kubepods.slice/" + sdRoot + "-kubepods-pod" + under(uidB) + ".slice/cri-containerd-" + b1 + ".scope",
		// pod C other/web: systemd, BestEffort, CRI-O, v2 only
		c1: sdRoot + ".slice/" + sdRoot + "-kubepods.slice/" + sdRoot + "-kubepods-besteffort.slice/" + sdRoot + "-kubepods-besteffort-pod" + under(uidC) + ".slice/crio-" + c1 + ".scope",
		// pod D: cgroupfs, Guaranteed, v2 only, no log directory
		d1: fsRoot + "/kubepods/pod" + uidD + "/" + d1,
	}
	inV1 := map[string]bool{a0: true, a1: true, a2: true, b1: true}
	inV2 := map[string]bool{a0: true, a1: true, a2: true, c1: true, d1: true}

	// create every cgroup first so their removal runs after the processes die
	dirs1, dirs2 := map[string]string{}, map[string]string{}
	for _, id := range []string{a0, a1, a2, b1, c1, d1} {
		if inV1[id] {
			dirs1[id] = mkCgroup(t, v1, rel[id])
		}
		if inV2[id] {
			dirs2[id] = mkCgroup(t, v2, rel[id])
		}
	}
	pids := map[string]int{}
	for _, id := range []string{a0, a1, a2, b1, c1, d1} {
		bin := sleep
		if id == a0 {
			bin = pause
		}
		pids[id] = startProc(t, bin, "300")
		if inV1[id] {
			moveInto(t, pids[id], dirs1[id])
		}
		if inV2[id] {
			moveInto(t, pids[id], dirs2[id])
		}
	}

	logs := t.TempDir()
	// dockershim/cri-dockerd style: N.log is a symlink naming the container id
	os.MkdirAll(filepath.Join(logs, "shop_web_"+uidA, "app"), 0o755)
	os.MkdirAll(filepath.Join(logs, "shop_web_"+uidA, "sidecar"), 0o755)
	os.Symlink("/var/lib/docker/containers/"+a1+"/"+a1+"-json.log", filepath.Join(logs, "shop_web_"+uidA, "app", "0.log"))
	os.Symlink("/var/lib/docker/containers/"+a2+"/"+a2+"-json.log", filepath.Join(logs, "shop_web_"+uidA, "sidecar", "0.log"))
	// containerd/CRI-O style: plain files
	writeFile(t, filepath.Join(logs, "shop_db_"+uidB, "postgres", "0.log"), "2026-01-01T00:00:00Z stdout F ready\n")
	writeFile(t, filepath.Join(logs, "other_web_"+uidC, "app", "1.log"), "")

	p := Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs,
		CRISockets: []string{filepath.Join(t.TempDir(), "absent.sock")}}
	found, err := Discover(context.Background(), p)
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	mine := map[string]bool{uidA: true, uidB: true, uidC: true, uidD: true}
	var all []Container
	for _, c := range found {
		if mine[c.PodUID] {
			all = append(all, c)
		}
	}
	got := byID(all)
	if _, ok := got[a0]; ok {
		t.Errorf("the sandbox (pause) cgroup %s was reported as a container", a0)
	}
	type want struct{ ns, pod, uid, name, rt, qos, src string }
	wants := map[string]want{
		a1: {"shop", "web", uidA, "app", "", QoSBurstable, SourcePodLogs},
		a2: {"shop", "web", uidA, "sidecar", "", QoSBurstable, SourcePodLogs},
		b1: {"shop", "db", uidB, "postgres", RuntimeContainerd, QoSGuaranteed, SourcePodLogs},
		c1: {"other", "web", uidC, "app", RuntimeCRIO, QoSBestEffort, SourcePodLogs},
		d1: {"", "", uidD, "", "", QoSGuaranteed, SourceCgroup},
	}
	if len(all) != len(wants) {
		for _, c := range all {
			t.Logf("found %s", fmtContainer(c))
		}
		t.Fatalf("Discover found %d containers of the test pods, want %d", len(all), len(wants))
	}
	for id, w := range wants {
		c, ok := got[id]
		if !ok {
			t.Errorf("container %s (%s/%s) not found", id, w.ns, w.pod)
			continue
		}
		g := want{c.Namespace, c.Pod, c.PodUID, c.Name, c.Runtime, c.QoS, c.Source}
		if g != w {
			t.Errorf("container %.12s: got %+v, want %+v", id, g, w)
		}
		if !reflect.DeepEqual(c.Pids, []int{pids[id]}) {
			t.Errorf("container %.12s: pids %v, want [%d]", id, c.Pids, pids[id])
		}
		if c.CgroupV1Memory != dirs1[id] || c.CgroupV2 != dirs2[id] {
			t.Errorf("container %.12s: cgroups v1=%q v2=%q, want v1=%q v2=%q", id, c.CgroupV1Memory, c.CgroupV2, dirs1[id], dirs2[id])
		}
	}

	// Select, as `memprof record --pod` uses it.
	sel := func(pod, ns, ctr string) ([]string, error) {
		cs, err := Select(all, pod, ns, ctr)
		var ids []string
		for _, c := range cs {
			ids = append(ids, c.ID)
		}
		return ids, err
	}
	wantErr := func(err error, parts ...string) {
		t.Helper()
		if err == nil {
			t.Errorf("want an error mentioning %q, got nil", parts)
			return
		}
		for _, s := range parts {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not mention %q", err, s)
			}
		}
	}
	_, err = sel("web", "", "")
	wantErr(err, "ambiguous", `"other"`, `"shop"`, "--namespace")
	ids, err := sel("web", "shop", "")
	if err != nil || len(ids) != 2 || ids[0] != a1 || ids[1] != a2 {
		t.Errorf("Select(web, shop) = %v, %v; want [app sidecar] ids", ids, err)
	}
	ids, err = sel("web", "shop", "sidecar")
	if err != nil || !reflect.DeepEqual(ids, []string{a2}) {
		t.Errorf("Select(web, shop, sidecar) = %v, %v; want [%s]", ids, err, a2)
	}
	_, err = sel("web", "shop", "nginx")
	wantErr(err, `"nginx"`, `"app"`, `"sidecar"`)
	_, err = sel("nope", "", "")
	wantErr(err, "not running on this node", "shop/web", "other/web", "shop/db", uidD)
	_, err = sel("db", "other", "")
	wantErr(err, `namespace "other"`, `"shop"`)
	ids, err = sel("db", "", "postgres")
	if err != nil || !reflect.DeepEqual(ids, []string{b1}) {
		t.Errorf("Select(db, postgres) = %v, %v; want [%s]", ids, err, b1)
	}
	ids, err = sel(uidD, "", "")
	if err != nil || !reflect.DeepEqual(ids, []string{d1}) {
		t.Errorf("Select(uid %s) = %v, %v; want [%s]", uidD, ids, err, d1)
	}

	// A pure cgroup v2 node: the same unified hierarchy mounted on its own
	// (cgroup.controllers at the root, no v1 memory directory).
	pure := t.TempDir()
	if err := syscall.Mount("none", pure, "cgroup2", 0, ""); err != nil {
		t.Fatalf("mount cgroup2 at %s: %v", pure, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(pure, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", pure, err)
		}
	})
	v2only, err := Discover(context.Background(), Paths{CgroupRoot: pure, ProcRoot: "/proc", PodLogs: logs})
	if err != nil {
		t.Fatalf("Discover on pure v2 root %s: %v", pure, err)
	}
	gotV2 := byID(v2only)
	for id := range inV2 {
		if id == a0 {
			continue
		}
		c, ok := gotV2[id]
		if !ok {
			t.Errorf("pure v2: container %.12s not found", id)
			continue
		}
		if want := filepath.Join(pure, rel[id]); c.CgroupV2 != want || c.CgroupV1Memory != "" || !reflect.DeepEqual(c.Pids, []int{pids[id]}) {
			t.Errorf("pure v2: %s, want v2=%s pids [%d]", fmtContainer(c), want, pids[id])
		}
		if c.Name != wants[id].name || c.Pod != wants[id].pod {
			t.Errorf("pure v2: %s, want pod %q container %q", fmtContainer(c), wants[id].pod, wants[id].name)
		}
	}
	if _, ok := gotV2[b1]; ok {
		t.Errorf("pure v2: found %.12s, which lives only in the v1 memory hierarchy", b1)
	}

	// A socket path that exists but is no CRI server: results still come
	// back, with an error wrapping ErrPartial that names the socket.
	bogus := filepath.Join(t.TempDir(), "bogus.sock")
	writeFile(t, bogus, "")
	p.CRISockets = []string{bogus}
	again, err := Discover(context.Background(), p)
	if !errors.Is(err, ErrPartial) || !strings.Contains(err.Error(), bogus) {
		t.Errorf("Discover with a dead CRI socket: err = %v, want ErrPartial naming %s", err, bogus)
	}
	if c, ok := byID(again)[a1]; !ok || c.Name != "app" {
		t.Errorf("Discover with a dead CRI socket lost container app: %+v", c)
	}
}
