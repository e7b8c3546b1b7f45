package procmaps

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

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

// TestReadBounded: a maps listing over MapsMaxBytes (a process mapping a
// hostile number of files under long paths) is an error naming the bound,
// not read whole; one at the bound is parsed.
func TestReadBounded(t *testing.T) {
	procRoot, _ := fakeProc(t)
	line := "7f0000000000-7f0000001000 r-xp 00000000 08:01 1234 /" + strings.Repeat("x", 200) + "\n"
	data := []byte(strings.Repeat(line, 100))
	if err := os.WriteFile(filepath.Join(procRoot, "4242", "maps"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	defer func(n int64) { MapsMaxBytes = n }(MapsMaxBytes)
	MapsMaxBytes = int64(len(data))
	if maps, err := Read(4242); err != nil || len(maps) != 100 {
		t.Fatalf("Read at the bound: %d mappings, %v; want 100", len(maps), err)
	}
	MapsMaxBytes = int64(len(data)) - 1
	if maps, err := Read(4242); err == nil || !strings.Contains(err.Error(), "over") {
		t.Fatalf("Read over the bound: %d mappings, %v; want an error naming the bound", len(maps), err)
	}
}

// TestReadTooLargeRefusedAtOnce: once a process's listing was over
// MapsMaxBytes, reads of the same process (same start time) are refused at
// once for MapsTooLargeRetry, without reading (its listing shrunk to one
// line meanwhile is not seen); a larger bound, or another process under
// the same pid (another start time), reads again.
func TestReadTooLargeRefusedAtOnce(t *testing.T) {
	procRoot, _ := fakeProc(t)
	dir := filepath.Join(procRoot, "4242")
	stat := func(start int) {
		t.Helper()
		s := fmt.Sprintf("4242 (hostile) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 1000 10 0\n", start)
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write := func(lines int) {
		t.Helper()
		line := "7f0000000000-7f0000001000 r--p 00000000 08:01 1234 /" + strings.Repeat("d", 3800) + "\n"
		if err := os.WriteFile(filepath.Join(dir, "maps"), []byte(strings.Repeat(line, lines)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stat(5000)
	write(100)
	defer func(n int64) { MapsMaxBytes = n }(MapsMaxBytes)
	MapsMaxBytes = 10_000
	if _, err := ReadRaw(4242); !errors.Is(err, ErrMapsTooLarge) {
		t.Fatalf("over the bound: %v, want ErrMapsTooLarge", err)
	}
	write(1)
	if _, err := Read(4242); !errors.Is(err, ErrMapsTooLarge) {
		t.Fatalf("the same process again: %v, want ErrMapsTooLarge without a read", err)
	}
	stat(6000) // the pid reused by another process
	if maps, err := Read(4242); err != nil || len(maps) != 1 {
		t.Fatalf("another process under the pid: %d mappings, %v; want its 1", len(maps), err)
	}
	write(100)
	if _, err := Read(4242); !errors.Is(err, ErrMapsTooLarge) {
		t.Fatalf("over the bound: %v", err)
	}
	write(1)
	MapsMaxBytes = 20_000
	if maps, err := Read(4242); err != nil || len(maps) != 1 {
		t.Fatalf("a larger bound: %d mappings, %v; want 1", len(maps), err)
	}
}
