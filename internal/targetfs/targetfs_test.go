package targetfs

import (
	"bytes"
	"debug/elf"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestOpenRefusesFIFO(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		f, err := Open(fifo)
		if err == nil {
			f.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNotRegular) {
			t.Errorf("Open(FIFO) = %v, want ErrNotRegular", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Open blocked on a FIFO")
	}
	f, err := OpenInRoot(dir, "/fifo")
	if !errors.Is(err, ErrNotRegular) {
		t.Errorf("OpenInRoot(FIFO) = %v, want ErrNotRegular", err)
	}
	if f != nil {
		f.Close()
	}
	if _, err := Open(dir); !errors.Is(err, ErrNotRegular) {
		t.Errorf("Open(directory) = %v, want ErrNotRegular", err)
	}
}

func TestOpenInRootConfines(t *testing.T) {
	root, host := t.TempDir(), t.TempDir()
	secret := filepath.Join(host, "secret")
	if err := os.WriteFile(secret, []byte("host"), 0o644); err != nil {
		t.Fatal(err)
	}
	inside := filepath.Join(root, secret) // the same path inside the root
	if err := os.MkdirAll(filepath.Dir(inside), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inside, []byte("root"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(root, "lib"), 0o755)
	os.Symlink(secret, filepath.Join(root, "lib/abs"))                            // absolute
	os.Symlink("../../../../../../../../"+secret, filepath.Join(root, "lib/rel")) // climbs past /
	os.Symlink("/proc/self/exe", filepath.Join(root, "lib/magic"))                // a magic link via /proc? (no /proc in root)
	for _, p := range []string{"/lib/abs", "lib/rel", "/../../../../" + secret} {
		f, err := OpenInRoot(root, p)
		if err != nil {
			t.Errorf("OpenInRoot(%s): %v", p, err)
			continue
		}
		b := make([]byte, 8)
		n, _ := f.Read(b)
		f.Close()
		if string(b[:n]) != "root" {
			t.Errorf("OpenInRoot(%s) read %q, want the file inside the root", p, b[:n])
		}
	}
	if f, err := OpenInRoot(root, "/lib/magic"); err == nil {
		f.Close()
		t.Error("OpenInRoot followed a symlink to /proc/self/exe out of the root")
	}
}

func TestCheckELF(t *testing.T) {
	exe, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	ef, err := elf.NewFile(bytes.NewReader(exe))
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckELF(ef, int64(len(exe))); err != nil {
		t.Fatalf("CheckELF of the test binary: %v", err)
	}
	if err := CheckELF(ef, 100); err == nil {
		t.Error("CheckELF accepted sections past a 100-byte file")
	}
	// The first section with file contents (which one depends on the
	// linker: -race links externally).
	i := slices.IndexFunc(ef.Sections, func(s *elf.Section) bool { return s.Type != elf.SHT_NULL && s.Type != elf.SHT_NOBITS })
	if i < 0 {
		t.Fatal("test binary has no section with contents")
	}
	ef.Sections[i].Size = MaxSectionBytes + 1
	if err := CheckELF(ef, int64(len(exe))); !errors.Is(err, ErrTooLarge) {
		t.Errorf("CheckELF of a section over the limit: %v", err)
	}
}

func TestGuard(t *testing.T) {
	p0, d0 := Failures()
	// The panic a parser trusting a length from the object would hit.
	at := func(b []byte, i int) byte { return b[i] }
	err := Guard("obj.so", time.Second, func() error { at(make([]byte, 4), 8); return nil })
	if !errors.Is(err, ErrPanic) || !strings.Contains(err.Error(), "obj.so") || !strings.Contains(err.Error(), "index out of range") {
		t.Errorf("Guard(panic) = %v", err)
	}
	start := time.Now()
	stop := make(chan struct{})
	defer close(stop)
	err = Guard("stuck.so", 50*time.Millisecond, func() error { <-stop; return nil })
	if !errors.Is(err, ErrDeadline) || time.Since(start) > 2*time.Second {
		t.Errorf("Guard(stuck) = %v after %v", err, time.Since(start))
	}
	if p, d := Failures(); p != p0+1 || d != d0+1 {
		t.Errorf("Failures() = %d, %d; want %d, %d", p, d, p0+1, d0+1)
	}
	if err := Guard("ok.so", time.Second, func() error { return nil }); err != nil {
		t.Error(err)
	}
}

func TestDigest(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("same build id, symbols A"), 0o644)
	os.WriteFile(b, []byte("same build id, symbols B"), 0o644)
	fa, _ := Open(a)
	fb, _ := Open(b)
	defer fa.Close()
	defer fb.Close()
	da, err1 := Digest(fa)
	db, err2 := Digest(fb)
	if err1 != nil || err2 != nil || da == db || len(da) != 64 {
		t.Errorf("digests %q %q (%v %v): want two different SHA-256", da, db, err1, err2)
	}
	sparse := filepath.Join(dir, "sparse")
	f, _ := os.Create(sparse)
	f.Truncate(MaxObjectBytes + 1)
	f.Close()
	fs, _ := Open(sparse)
	defer fs.Close()
	start := time.Now()
	if _, err := Digest(fs); !errors.Is(err, ErrTooLarge) || time.Since(start) > time.Second {
		t.Errorf("Digest of a sparse file over the limit: %v after %v", err, time.Since(start))
	}
}
