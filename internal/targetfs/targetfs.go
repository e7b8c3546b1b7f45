// Package targetfs is the one place memprof opens and reads files that a
// profiled process (a target) controls: its mapped objects, their separate
// debug files, its executable. Every such file is hostile input (issue 8):
//
//   - it is opened without following the target's symlinks out of its root:
//     through /proc/PID/map_files (the mapped object itself) or openat2(2)
//     with RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS on a dirfd of /proc/PID/root,
//     so an absolute symlink inside a container resolves inside the
//     container, never against memprof's (the host's) root;
//   - it is opened O_NONBLOCK and must be a regular file (fstat), so a FIFO,
//     socket or device planted in place of a library cannot block memprof;
//   - every read is bounded by the limits below, and work on one object runs
//     under Guard: a panic becomes an error naming the object, and an object
//     that takes longer than its deadline is abandoned and reported.
package targetfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotRegular is returned for a target file that is not a regular file
// (FIFO, socket, device, directory).
var ErrNotRegular = errors.New("not a regular file")

// openFlags open a target file for reading without blocking on a FIFO or
// device and without making it memprof's controlling terminal.
const openFlags = unix.O_RDONLY | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOCTTY

// Open opens path for reading as a target file: non-blocking, and only if it
// is a regular file. Symlinks (and /proc magic links such as
// /proc/PID/map_files/* and /proc/PID/exe) are followed: use it for paths
// memprof itself trusts (host debug directories, a command memprof starts,
// /proc magic links, which lead to the very file a process maps); use
// OpenInRoot for a path named by a target.
func Open(path string) (*os.File, error) {
	fd, err := unix.Open(path, openFlags, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return regular(fd, path)
}

// OpenInRoot opens path (absolute or relative, as a target names it) inside
// the directory root (normally /proc/PID/root) with openat2(2)
// RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS: "..", absolute paths and absolute
// symlinks all resolve inside root, and /proc magic links are refused. The
// file must be a regular file; it is opened non-blocking.
func OpenInRoot(root, path string) (*os.File, error) {
	dfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(dfd)
	rel := strings.TrimLeft(path, "/")
	if rel == "" {
		rel = "."
	}
	how := &unix.OpenHow{
		Flags:   uint64(openFlags),
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	var fd int
	for {
		fd, err = unix.Openat2(dfd, rel, how)
		if err != unix.EINTR && err != unix.EAGAIN {
			break
		}
	}
	if err != nil {
		return nil, &os.PathError{Op: "openat2", Path: filepath.Join(root, rel), Err: err}
	}
	return regular(fd, filepath.Join(root, rel))
}

// regular wraps fd if it is a regular file and closes it otherwise.
func regular(fd int, name string) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: name, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, &os.PathError{Op: "open", Path: name, Err: fmt.Errorf("%w (mode %#o)", ErrNotRegular, st.Mode&unix.S_IFMT)}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// Stat is the identity of an open file: device, inode, size and times. Two
// opens of the same unchanged file give equal Stats; rewriting the file
// changes Mtime and Ctime (Ctime cannot be set from user space).
type Stat struct {
	Dev, Inode   uint64 // Dev as the kernel encodes st_dev
	Size         int64
	Mtime, Ctime int64 // nanoseconds since the epoch
}

// Major is the major device number of Dev.
func (s Stat) Major() uint32 { return unix.Major(s.Dev) }

// Minor is the minor device number of Dev.
func (s Stat) Minor() uint32 { return unix.Minor(s.Dev) }

// StatOf returns the identity of an open file.
func StatOf(f *os.File) (Stat, error) {
	fi, err := f.Stat()
	if err != nil {
		return Stat{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return Stat{}, fmt.Errorf("stat %s: no system stat", f.Name())
	}
	return Stat{
		Dev: uint64(st.Dev), Inode: st.Ino, Size: st.Size,
		Mtime: st.Mtim.Nano(), Ctime: st.Ctim.Nano(),
	}, nil
}
