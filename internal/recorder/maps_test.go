package recorder

import (
	"testing"

	"github.com/memprof/memprof/internal/procmaps"
)

// TestExecFingerprint: the fingerprint of a process's mappings changes with
// its executable file mappings (dlopen, dlclose, exec) and only with them.
func TestExecFingerprint(t *testing.T) {
	parse := func(s string) []procmaps.Mapping {
		ms, err := procmaps.Parse([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return ms
	}
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
