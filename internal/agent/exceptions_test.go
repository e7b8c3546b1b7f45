package agent

import (
	"bytes"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"
	"golang.org/x/sys/unix"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/testprog/kube"
)

// excNewTruth is what testdata/exc_new.cc keeps live (see its header):
// bytes in use at the sites after the failed calls, by function name.
var excNewTruth = map[string]int64{
	"exc::after":                 100_000,
	"exc::after_nothrow":         200_000,
	"exc::after_aligned":         409_600,
	"exc::after_aligned_nothrow": 819_200,
}

// TestAgentExceptions: a runc container runs a C++ program that catches
// std::bad_alloc from the throwing and aligned operator new and gets null
// from the nothrow variants, while the agent profiles it at sample rate 1.
// The program is attached to before it throws (it waits for SIGUSR1), must
// exit with status 0 (a return probe on operator new ended it in
// std::terminate, SIGABRT), and the blocks it allocates after the failed
// calls must be exactly in the container's heap profile.
//
// The container has its own copies of libc, libstdc++ and libgcc_s
// (kube.Rootfs copies the libraries the binary links: other inodes than the
// host's), so no other tool's probe on the host's libstdc++ can touch it.
// Its exit status is taken by making the test process the child subreaper:
// `runc run -d` exits at once and the container's init is reparented here.
func TestAgentExceptions(t *testing.T) {
	testprog.RequireRoot(t)
	bin := testprog.Build(t, "exc_new.cc")
	root := kube.Rootfs(t, bin)
	var stdcxx bool
	for _, lib := range kube.Libs(t, bin) {
		stdcxx = stdcxx || strings.Contains(lib, "libstdc++")
	}
	if !stdcxx {
		t.Fatalf("%s does not link libstdc++: the test would not probe the C++ operator new", bin)
	}
	fsRoot := "memprof-exc-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpx-" + randHex(6)

	a, tok, _ := startAgent(t, Config{
		Paths:            podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces:       []string{ns},
		ProfileInterval:  time.Hour,
		Retention:        time.Hour,
		SampleRate:       1,
		DiscoverInterval: 300 * time.Millisecond,
		CollectInterval:  500 * time.Millisecond,
		NoRSS:            true,
	})

	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	pod := kube.Pod{Namespace: ns, Name: "exc", UID: newUID()}
	c := kube.RunContainer(t, kube.RuncSpec{FSRoot: fsRoot, Pod: pod, Name: "app", Rootfs: root, Logs: logs,
		Args: []string{"/exc_new", "--signal", "--wait-start", "--wait-end"}})
	// Reaped here, unless the test ends before the program does.
	reaped := false
	t.Cleanup(func() {
		if !reaped {
			syscall.Kill(c.Pid, syscall.SIGKILL)
			var ws syscall.WaitStatus
			syscall.Wait4(c.Pid, &ws, 0, nil)
		}
	})
	waitFor(t, 10*time.Second, "the program to start", func() bool { return strings.Contains(c.Output(), "READY") })
	t0 := time.Now()
	waitFor(t, 20*time.Second, "the agent to attach to the program", func() bool {
		c := findContainer(a, ns, "exc")
		return c != nil && c.Processes >= 1
	})
	t.Logf("attached %v after the container started", time.Since(t0).Round(time.Millisecond))

	if err := syscall.Kill(c.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the program to finish its allocations", func() bool { return strings.Contains(c.Output(), "DONE") })
	out := c.Output()
	if !strings.Contains(out, "caught=6\n") || !strings.Contains(out, "nulls=6\n") {
		t.Errorf("program output %q, want caught=6 and nulls=6", out)
	}

	// The profile while the program still holds its blocks: the events
	// are read asynchronously, so wait until every site has its bytes (or
	// more, which fails below), then compare exactly.
	base := "http://" + a.Addr()
	q := url.Values{"namespace": {ns}, "pod": {"exc"}, "container": {"app"}}
	var got map[string]int64
	var hp *profile.Profile
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, body := get(t, base+"/profiles/heap?"+q.Encode(), tok)
		if code == 200 {
			if p, err := profile.Parse(bytes.NewReader(body)); err == nil {
				hp, got = p, inuseByLeaf(t, p)
				complete := true
				for fn, want := range excNewTruth {
					complete = complete && got[fn] >= want
				}
				if complete {
					break
				}
			}
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if hp == nil {
		t.Fatal("no heap profile of the container")
	}
	for fn, want := range excNewTruth {
		if got[fn] != want {
			t.Errorf("%s: inuse_space %d in the agent's profile, want exactly %d (sample rate 1)", fn, got[fn], want)
		}
	}
	// The 6 operator new calls left by their exception are abandoned, and
	// so may be the 6 nothrow calls of libstdc++, which catch the exception
	// inside (allocated by malloc from __cxa_allocate_exception, outside the
	// pending call's functions); no other call of the program may count.
	abandoned := -1
	for _, cm := range hp.Comments {
		if v, ok := strings.CutPrefix(cm, "memprof: lost_abandoned_call="); ok {
			abandoned, _ = strconv.Atoi(v)
		}
		if strings.Contains(cm, "lost") || strings.Contains(cm, "error") {
			t.Logf("profile comment: %s", cm)
		}
	}
	if abandoned < 6 || abandoned > 12 {
		t.Errorf("abandoned calls %d in the profile's comments, want 6 to 12 (the failed operator new calls)", abandoned)
	}
	if t.Failed() {
		t.Logf("inuse by leaf function: %v", got)
	}
	t.Logf("agent heap profile of the container: %v (truth %v)", pick(got, excNewTruth), excNewTruth)

	// The program exits by itself: status 0, not SIGABRT.
	if err := syscall.Kill(c.Pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var ws syscall.WaitStatus
	done := make(chan error, 1)
	go func() {
		_, err := syscall.Wait4(c.Pid, &ws, 0, nil)
		done <- err
	}()
	select {
	case err := <-done:
		reaped = true
		if err != nil {
			t.Fatalf("wait4 %d: %v (the container's init was not reparented to the test)", c.Pid, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the program did not exit within 10s of its last signal; output %q", c.Output())
	}
	if !ws.Exited() || ws.ExitStatus() != 0 {
		t.Errorf("the program ended with %v (signaled %t, signal %v), want exit status 0; output %q", ws, ws.Signaled(), ws.Signal(), c.Output())
	}
	t.Logf("the program exited with status %d", ws.ExitStatus())
}

// inuseByLeaf sums inuse_space by the function of each sample's first
// location (the allocating site: the allocator's frames are not kept).
func inuseByLeaf(t *testing.T, p *profile.Profile) map[string]int64 {
	t.Helper()
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "inuse_space" {
			idx = i
		}
	}
	if idx < 0 {
		t.Fatalf("profile has no sample type inuse_space")
	}
	out := map[string]int64{}
	for _, s := range p.Sample {
		name := "?"
		if len(s.Location) > 0 && len(s.Location[0].Line) > 0 {
			name = s.Location[0].Line[0].Function.Name
		}
		out[name] += s.Value[idx]
	}
	return out
}

func pick(m, keys map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k := range keys {
		out[k] = m[k]
	}
	return out
}
