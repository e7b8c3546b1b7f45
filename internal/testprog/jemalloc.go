package testprog

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// JemallocSysSource is jemalloc's source tree as Rust's jemalloc-sys crate
// vendors it (Debian package librust-jemalloc-sys-dev, jemalloc 5.1.0): the
// allocator Rust programs link statically under the _rjem_ prefix.
const JemallocSysSource = "/usr/share/cargo/registry/jemalloc-sys-0.3.2"

// PrefixedJemalloc returns a static jemalloc library (libjemalloc_pic.a)
// built from JemallocSysSource with --with-jemalloc-prefix=prefix, as
// jemalloc-sys (_rjem_) and upstream Redis (je_) build it. The build takes
// about a minute and is kept in the system's temporary directory for later
// runs (one per prefix; concurrent test processes wait for each other).
func PrefixedJemalloc(t testing.TB, prefix string) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(JemallocSysSource, "jemalloc", "src")); err != nil {
		t.Fatalf("jemalloc sources missing (%v): install the Debian package librust-jemalloc-sys-dev", err)
	}
	dir := filepath.Join(os.TempDir(), "memprof-testcache", "jemalloc-5.1.0-prefix-"+prefix)
	lib := filepath.Join(dir, "build", "lib", "libjemalloc_pic.a")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	if _, err := os.Stat(lib); err == nil {
		return lib
	}
	t.Logf("building jemalloc with prefix %s in %s (once, about a minute)", prefix, dir)
	src := filepath.Join(dir, "src")
	build := filepath.Join(dir, "build")
	os.RemoveAll(src)
	os.RemoveAll(build)
	steps := [][]string{
		{"cp", "-r", filepath.Join(JemallocSysSource, "jemalloc"), src},
		// jemalloc-sys ships the generated configure script apart.
		{"cp", filepath.Join(JemallocSysSource, "configure", "configure"), filepath.Join(src, "configure")},
		{"mkdir", "-p", build},
		{"sh", filepath.Join(src, "configure"), "--disable-cxx", "--with-jemalloc-prefix=" + prefix, "--with-private-namespace=" + prefix, "--prefix=" + filepath.Join(dir, "out")},
		// Only the position-independent archive (tests link PIE executables).
		{"make", "-j2", "srcroot=" + src + "/", "lib/libjemalloc_pic.a"},
	}
	for _, s := range steps {
		cmd := exec.Command(s[0], s[1:]...)
		cmd.Dir = build
		if s[0] != "sh" && s[0] != "make" {
			cmd.Dir = dir
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", s, err, tail(out))
		}
	}
	if _, err := os.Stat(lib); err != nil {
		t.Fatalf("jemalloc build left no %s: %v", lib, err)
	}
	return lib
}

func tail(b []byte) []byte {
	if len(b) > 4000 {
		return b[len(b)-4000:]
	}
	return b
}
