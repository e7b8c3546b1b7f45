package procmaps

import (
	"os"
	"path/filepath"
	"testing"
)

// TestStartTime parses /proc/PID/stat lines, comm with spaces and
// parentheses included, from a fake proc root.
func TestStartTime(t *testing.T) {
	root := t.TempDir()
	old := ProcRoot
	ProcRoot = root
	defer func() { ProcRoot = old }()
	// Fields after comm: state (3) ... starttime (22).
	rest := func(state string) string {
		return state + " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21 22\n"
	}
	for _, tc := range []struct {
		pid     string
		stat    string
		start   uint64
		running bool
	}{
		{"10", "10 (sleep) " + rest("S"), 987654, true},
		{"11", "11 (a) (b) ) x) " + rest("R"), 987654, true},
		{"12", "12 (zombie) " + rest("Z"), 987654, false},
		{"13", "13 (short) S 1 2", 0, false},
		{"14", "no parenthesis", 0, false},
	} {
		os.MkdirAll(filepath.Join(root, tc.pid), 0o755)
		os.WriteFile(filepath.Join(root, tc.pid, "stat"), []byte(tc.stat), 0o644)
		var pid int
		for _, c := range tc.pid {
			pid = pid*10 + int(c-'0')
		}
		start, running := StartTime(pid)
		if start != tc.start || running != tc.running {
			t.Errorf("%q: start %d running %t, want %d %t", tc.stat, start, running, tc.start, tc.running)
		}
	}
	if _, running := StartTime(99); running {
		t.Errorf("a missing pid runs")
	}
}
