package procmaps

import "testing"

func TestParsePaths(t *testing.T) {
	maps, err := Parse([]byte("55665b980000-55665c9df000 rw-p 00000000 00:00 0                          [heap]\n" +
		"7f0000100000-7f0000200000 r-xp 00001000 08:01 1234                       /opt/my lib/a b.so (deleted)\n" +
		"7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"[heap]", "/opt/my lib/a b.so", ""} {
		if maps[i].Path != want {
			t.Errorf("mapping %d path %q, want %q", i, maps[i].Path, want)
		}
	}
}

// A process name is the target's to choose: control characters must not
// reach a terminal raw.
func TestEscapeControl(t *testing.T) {
	for in, want := range map[string]string{
		"redis-server":            "redis-server",
		"a\n\x1b[31mX\x1b]0;pw\a": `a\n\x1b[31mX\x1b]0;pw\a`,
		"caf\xe9":                 `caf\xe9`,
		"naïve":                   "naïve",
	} {
		if got := escapeControl(in); got != want {
			t.Errorf("escapeControl(%q) = %q, want %q", in, got, want)
		}
	}
}
