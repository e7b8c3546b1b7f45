// Gating the poll loop's work: re-listing the followed cgroups on process
// creation, the liveness checks to once a second.

package recorder

import (
	"bytes"
	"os"
	"path/filepath"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
)

// liveCheck is how often the poll loop checks that its targets are alive
// (one /proc/PID/stat read each) and looks at their mappings when due: an
// exit is seen within liveCheck (the tracer sees the exit of a command
// memprof started at once).
var liveCheck = time.Second

// rescanMax is the longest the followed cgroups go without their process
// lists read while no process is created on the host.
var rescanMax = 2 * time.Second

// rescanGate tells the poll loop when to re-list the followed cgroups:
// when a process or thread was created on the host since the last listing
// (the last pid of /proc/loadavg, in memprof's pid namespace, changed), or
// rescanMax after the last listing (a process created just before a
// listing and moved into a cgroup after it, or moved in long after it
// started). On a host where nothing starts, a poll costs one small read
// instead of one cgroup.procs read per followed cgroup; where threads start
// all the time, every poll lists, as without the gate.
type rescanGate struct {
	lastPid []byte
	last    time.Time
}

func (g *rescanGate) due(now time.Time) bool {
	var pid []byte
	if b, err := os.ReadFile(filepath.Join(procmaps.ProcRoot, "loadavg")); err == nil {
		if f := bytes.Fields(b); len(f) == 5 {
			pid = f[4]
		}
	}
	if pid == nil || !bytes.Equal(pid, g.lastPid) || now.Sub(g.last) >= rescanMax {
		g.lastPid, g.last = pid, now
		return true
	}
	return false
}
