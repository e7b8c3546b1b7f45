package procmaps

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/targetfs"
)

// fakeProc builds a procfs-like tree for pid 4242 whose root is a
// directory (no map_files), like a container seen without CAP_SYS_ADMIN.
func fakeProc(t *testing.T) (procRoot, root string) {
	t.Helper()
	procRoot, root = t.TempDir(), t.TempDir()
	if err := os.MkdirAll(filepath.Join(procRoot, "4242"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(root, filepath.Join(procRoot, "4242", "root")); err != nil {
		t.Fatal(err)
	}
	old := ProcRoot
	ProcRoot = procRoot
	t.Cleanup(func() { ProcRoot = old })
	return procRoot, root
}

func mappingOf(t *testing.T, path, as string) Mapping {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := targetfs.StatOf(f)
	if err != nil {
		t.Fatal(err)
	}
	return Mapping{Start: 0x1000, End: 0x2000, Perms: "r-xp", DevMajor: st.Major(), DevMinor: st.Minor(), Inode: st.Inode, Path: as}
}

func TestOpenConfinedToRoot(t *testing.T) {
	_, root := fakeProc(t)
	host := t.TempDir()
	os.MkdirAll(filepath.Join(root, "lib"), 0o755)
	lib := filepath.Join(root, "lib", "libok.so")
	os.WriteFile(lib, []byte("library"), 0o644)

	// The right file: opened through the root, identity checked.
	m := mappingOf(t, lib, "/lib/libok.so")
	f, err := Open(4242, &m)
	if err != nil {
		t.Fatalf("Open of the mapped file: %v", err)
	}
	f.Close()

	// Same inode, other device: refused.
	bad := m
	bad.DevMinor++
	if f, err := Open(4242, &bad); err == nil {
		f.Close()
		t.Error("Open accepted a file on another device with the same inode")
	}

	// The mapped path became an absolute symlink to a host FIFO: no block,
	// no host file.
	fifo := filepath.Join(host, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(lib)
	os.Symlink(fifo, lib)
	done := make(chan error, 1)
	go func() {
		f, err := Open(4242, &m)
		if err == nil {
			f.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Open followed an absolute symlink to a host FIFO")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Open blocked on a symlink to a host FIFO")
	}
	// A FIFO inside the root is refused too.
	os.Remove(lib)
	syscall.Mkfifo(lib, 0o644)
	if _, err := Open(4242, &m); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Open of a FIFO: %v, want not a regular file", err)
	}
}
