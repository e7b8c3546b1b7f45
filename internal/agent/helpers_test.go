package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/testprog/kube"
)

// The node fixtures (cgroups, runc containers, pod log entries) are shared
// with internal/podfind's tests in internal/testprog/kube.
var (
	randHex          = kube.RandHex
	newUID           = kube.NewUID
	writeFile        = kube.WriteFile
	waitFor          = kube.WaitFor
	mkCgroup         = kube.MkCgroup
	rmCgroup         = kube.RmCgroup
	removeCgroupTree = kube.RemoveCgroupTree
)

// startAgent runs an agent for the test; it is stopped (as by SIGTERM) and
// must return cleanly when the test ends, or earlier by calling stop.
func startAgent(t *testing.T, cfg Config) (*Agent, string, func()) {
	t.Helper()
	tok := randHex(32)
	if cfg.TokenFile == "" {
		cfg.TokenFile = filepath.Join(t.TempDir(), "token")
		writeFile(t, cfg.TokenFile, tok+"\n")
	}
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	cfg.Listen = "127.0.0.1:0"
	if cfg.NodeName == "" {
		cfg.NodeName = "test-node"
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("agent.Run returned %v after shutdown", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("agent did not stop within 20s of cancellation")
			}
		})
	}
	t.Cleanup(stop)
	waitFor(t, 20*time.Second, "the agent to load its programs", func() bool {
		select {
		case err := <-done:
			t.Fatalf("agent.Run: %v", err)
		default:
		}
		return a.Ready()
	})
	return a, tok, stop
}

// bpfFDs counts this process's BPF map, program and link descriptors.
func bpfFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		if strings.HasPrefix(l, "anon_inode:bpf") {
			n++
		}
	}
	return n
}

func get(t *testing.T, url, token string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// metric finds a sample of the exposition text whose labels include want.
func metric(text, name string, want map[string]string) (float64, bool) {
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf(`%s="%s"`, k, v)) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			return v, true
		}
	}
	return 0, false
}

func findContainer(a *Agent, ns, pod string) *ContainerInfo {
	for _, c := range a.Containers() {
		if c.Namespace == ns && c.Pod == pod {
			return &c
		}
	}
	return nil
}

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
