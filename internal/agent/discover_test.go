package agent

import (
	"bufio"
	"fmt"
	"math/bits"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/procwatch"
	"github.com/memprof/memprof/internal/testprog"
)

// firstMs: when agent_workload's "first" mode allocates block i (4096 << i
// bytes) after joining its container, in ms.
var firstMs = [12]int{0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000}

var attachedRe = regexp.MustCompile(`attached to process (\d+) `)

// TestAgentDiscoversOnCgroupEvents: with discovery's periodic listing left
// at its default (30 s, a safety net), a container started while the agent
// runs is found from the kernel's cgroup events and profiled from the
// attach on: of blocks allocated 0 ms to 4 s after its process joined its
// cgroup, every one from the first seen on is in its heap profile to the
// byte (sample rate 1), and the first seen was allocated within 4 s (the
// test logs when: ~0.1-0.2 s here). Blocks allocated before the attach are
// not seen: the attach follows the event, it cannot precede the process's
// first instructions. Its removal makes the agent forget it (gone from
// /containers and the metrics) within 5 s.
func TestAgentDiscoversOnCgroupEvents(t *testing.T) {
	testprog.RequireRoot(t)
	wl := testprog.Build(t, "agent_workload.c")
	fsRoot := "memprof-agevents-" + randHex(8)
	t.Cleanup(func() { removeCgroupTree(t, fsRoot) })
	logs := t.TempDir()
	ns := "mpe-" + randHex(6)
	var mu sync.Mutex
	attachedAt := map[int]time.Time{}
	a, _, _ := startAgent(t, Config{
		Paths:      podfind.Paths{CgroupRoot: "/sys/fs/cgroup", ProcRoot: "/proc", PodLogs: logs},
		Namespaces: []string{ns},
		SampleRate: 1,
		NoRSS:      true,
		Logf: func(f string, args ...any) {
			now, msg := time.Now(), fmt.Sprintf(f, args...)
			if m := attachedRe.FindStringSubmatch(msg); m != nil {
				pid, _ := strconv.Atoi(m[1])
				mu.Lock()
				attachedAt[pid] = now
				mu.Unlock()
			}
			t.Log(now.Format("15:04:05.000"), msg)
		},
	})
	if src := a.s.ProcEvents(); src != procwatch.SourceBPF {
		t.Fatalf("process events from %q, want %q (the BPF programs did not load?)", src, procwatch.SourceBPF)
	}
	time.Sleep(200 * time.Millisecond) // the agent's first listing is over

	pod := "first-" + randHex(4)
	dir := fakePod(t, fsRoot, logs, ns, pod, "app")
	cmd := exec.Command(wl, "first", filepath.Join(dir, "cgroup.procs"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rd := bufio.NewReader(out)
	line, _ := rd.ReadString('\n')
	var joinedNs int64
	if _, err := fmt.Sscanf(line, "joined %d", &joinedNs); err != nil {
		t.Fatalf("the workload said %q", line)
	}
	if line, _ := rd.ReadString('\n'); strings.TrimSpace(line) != "done" {
		t.Fatalf("the workload said %q, want done", line)
	}

	// The bytes of agent_first_alloc in the container's profile: a sum of
	// distinct powers of two, so it tells exactly which blocks were seen.
	var seen uint64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		conts := a.find(ns, pod, "")
		if len(conts) == 0 {
			continue
		}
		p, err := a.heapProfile(conts, nil)
		if err != nil {
			t.Fatal(err)
		}
		inuse := -1
		for i, st := range p.SampleType {
			if st.Type == "inuse_space" {
				inuse = i
			}
		}
		var b int64
		for _, s := range p.Sample {
			for _, loc := range s.Location {
				if len(loc.Line) > 0 && loc.Line[0].Function.Name == "agent_first_alloc" {
					b += s.Value[inuse]
					break
				}
			}
		}
		seen = uint64(b)
		if seen>>12&(1<<11) != 0 {
			break
		}
	}
	mask := seen >> 12
	if seen%4096 != 0 || mask >= 1<<12 {
		t.Fatalf("agent_first_alloc holds %d bytes in the profile: not a sum of the blocks 4096<<i (i < 12)", seen)
	}
	first := bits.TrailingZeros64(mask)
	t.Log("joined at", time.Unix(0, joinedNs).Format("15:04:05.000"))
	mu.Lock()
	at, ok := attachedAt[cmd.Process.Pid]
	mu.Unlock()
	lat := "never"
	if ok {
		lat = at.Sub(time.Unix(0, joinedNs)).Round(time.Millisecond).String()
	}
	t.Logf("blocks seen (bit i: allocated %v ms after the join): %012b; the first seen was allocated %d ms after the join; attached %s after the join",
		firstMs, mask, firstMs[min(first, 11)], lat)
	if mask == 0 {
		t.Fatalf("no block of the container's process in its profile 10 s after it started (the last 4 s after): it was not discovered from the cgroup events")
	}
	if want := uint64(1<<12) - 1<<first; mask != want {
		t.Errorf("blocks seen %012b: a block after the first one seen (%d ms) is missing (want %012b)", mask, firstMs[first], want)
	}

	// The container goes: its process ends and its cgroup is removed.
	cmd.Process.Kill()
	cmd.Wait()
	t0 := time.Now()
	rmCgroup(t, dir)
	waitFor(t, 5*time.Second, "the agent to forget the removed container", func() bool {
		if findContainer(a, ns, pod) != nil {
			return false
		}
		_, b := get(t, "http://"+a.Addr()+"/metrics", "")
		return !strings.Contains(string(b), `pod="`+pod+`"`)
	})
	t.Logf("the removed container left /containers and the metrics %s after its cgroup was removed", time.Since(t0).Round(time.Millisecond))
}
