// Package testprog compiles the C and C++ programs in testdata/ for tests, so
// every test runs real binaries built on the machine it runs on.
package testprog

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Root is the repository root (the directory holding go.mod).
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Testdata returns the path of a file in testdata/.
func Testdata(name string) string { return filepath.Join(Root(), "testdata", name) }

// Build compiles testdata/<src> (C, or C++ when it ends in .cc/.cpp) into a
// binary in a temporary directory and returns its path. extra are passed to
// the compiler after the defaults (-g -O1 -fno-omit-frame-pointer -pthread).
func Build(t testing.TB, src string, extra ...string) string {
	t.Helper()
	dir := t.TempDir()
	out := filepath.Join(dir, strings.TrimSuffix(filepath.Base(src), filepath.Ext(src)))
	cc := "gcc"
	if strings.HasSuffix(src, ".cc") || strings.HasSuffix(src, ".cpp") {
		cc = "g++"
	}
	args := []string{"-g", "-O1", "-fno-omit-frame-pointer", "-pthread"}
	args = append(args, extra...)
	args = append(args, "-o", out, Testdata(src))
	cmd := exec.Command(cc, args...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", cc, strings.Join(args, " "), err, b)
	}
	return out
}

// Jemalloc is the path of Debian's libjemalloc2; tests that need it fail
// (not skip) when it is missing, because .ci/run installs it.
const Jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

// RequireRoot fails the test when not running as root: these tests load BPF
// programs and create cgroups, and CI runs them as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("root tier (real BPF, uprobes, cgroups): run without -short")
	}
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (BPF, uprobes, cgroups); run the suite as root")
	}
}
