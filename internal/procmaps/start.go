package procmaps

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
)

// StartTime returns the start time of pid (clock ticks after boot, field 22
// of /proc/PID/stat) and whether the process runs (exists and is not a
// zombie). A pid and its start time identify a process: a reused pid has
// another start time.
func StartTime(pid int) (start uint64, running bool) {
	b, err := os.ReadFile(filepath.Join(ProcRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, false
	}
	// The fields after comm, which may hold spaces and parentheses, start
	// after its last ')': state is field 3, starttime field 22.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, false
	}
	start, err = strconv.ParseUint(string(f[19]), 10, 64)
	if err != nil {
		return 0, false
	}
	return start, f[0][0] != 'Z' && f[0][0] != 'X'
}
