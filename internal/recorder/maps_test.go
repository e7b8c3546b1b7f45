package recorder

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
)

// TestExecFingerprint: the fingerprint of a process's mappings changes with
// its executable file mappings (dlopen, dlclose, exec) and only with them.
func TestExecFingerprint(t *testing.T) {
	parse := func(s string) []byte { return []byte(s) }
	const base = `55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1311 /usr/bin/prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1311 /usr/bin/prog
55d0c1b00000-55d0c1b21000 rw-p 00000000 00:00 0 [heap]
7f1e2c000000-7f1e2c028000 r--p 00000000 08:01 2622 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c028000-7f1e2c1bd000 r-xp 00028000 08:01 2622 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd4b3f0000-7ffd4b3f2000 r-xp 00000000 00:00 0 [vdso]
`
	fp := execFingerprint(parse(base))
	same := map[string]string{
		"heap grown":          `55d0c1b00000-55d0c1b21000 rw-p 00000000 00:00 0 [heap]` + "\n" + `7f1e20000000-7f1e24000000 rw-p 00000000 00:00 0` + "\n",
		"data file mapped":    `7f1e10000000-7f1e10001000 r--p 00000000 08:01 4000 /var/data.bin` + "\n",
		"anonymous exec page": `7f1e30000000-7f1e30001000 rwxp 00000000 00:00 0` + "\n",
	}
	for what, extra := range same {
		if got := execFingerprint(parse(base + extra)); got != fp {
			t.Errorf("%s: fingerprint changed (%x -> %x), want the same", what, fp, got)
		}
	}
	changed := map[string]string{
		"library dlopened": base + `7f1e2d000000-7f1e2d010000 r-xp 00002000 08:01 5000 /usr/lib/libjemalloc.so.2` + "\n",
		"exec of another program": `55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 7777 /usr/bin/other` + "\n" +
			`7f1e2c028000-7f1e2c1bd000 r-xp 00028000 08:01 2622 /usr/lib/x86_64-linux-gnu/libc.so.6` + "\n",
		"library reloaded elsewhere": `55d0c0a01000-55d0c0a02000 r-xp 00001000 08:01 1311 /usr/bin/prog` + "\n" +
			`7f1e3c028000-7f1e3c1bd000 r-xp 00028000 08:01 2622 /usr/lib/x86_64-linux-gnu/libc.so.6` + "\n",
	}
	for what, maps := range changed {
		if got := execFingerprint(parse(maps)); got == fp {
			t.Errorf("%s: fingerprint unchanged, want a new one", what)
		}
	}
}

// TestRescanGate: the followed cgroups are re-listed when the host's last
// created pid changes, and at least every rescanMax, not at every poll.
func TestRescanGate(t *testing.T) {
	old := procmaps.ProcRoot
	procmaps.ProcRoot = t.TempDir()
	t.Cleanup(func() { procmaps.ProcRoot = old })
	write := func(last string) {
		if err := os.WriteFile(filepath.Join(procmaps.ProcRoot, "loadavg"), []byte("0.10 0.20 0.30 1/200 "+last+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var g rescanGate
	t0 := time.Unix(1000, 0)
	write("500")
	for _, c := range []struct {
		after time.Duration
		last  string
		want  bool
	}{
		{0, "500", true}, // first poll
		{200 * time.Millisecond, "500", false},
		{400 * time.Millisecond, "500", false},
		{600 * time.Millisecond, "501", true}, // a process started
		{800 * time.Millisecond, "501", false},
		{2600 * time.Millisecond, "501", true}, // rescanMax after the last listing
		{2800 * time.Millisecond, "", true},    // unreadable: always list
	} {
		if c.last == "" {
			os.Remove(filepath.Join(procmaps.ProcRoot, "loadavg"))
		} else {
			write(c.last)
		}
		if got := g.due(t0.Add(c.after)); got != c.want {
			t.Errorf("at +%s with last pid %q: due %t, want %t", c.after, c.last, got, c.want)
		}
	}
}
