// Package procmaps reads a process's memory map (/proc/PID/maps) and opens the
// files behind it the way the process sees them: through /proc/PID/root, so a
// process in another mount namespace (a container) resolves to its own files.
package procmaps

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/memprof/memprof/internal/targetfs"
)

// ProcRoot is the procfs mount. The Kubernetes agent points it at the host's
// /proc when it runs inside its own container.
var ProcRoot = "/proc"

// FileID identifies a mapped file independently of the path it was reached by.
type FileID struct {
	Dev   uint64 // device number as the kernel prints it in maps (major<<8|minor packed by Mkdev)
	Inode uint64
}

func (id FileID) String() string { return fmt.Sprintf("%x:%d", id.Dev, id.Inode) }

// Mapping is one line of /proc/PID/maps.
type Mapping struct {
	Start, End uint64 // virtual address range [Start, End)
	Perms      string // "r-xp" etc.
	Offset     uint64 // file offset of Start
	DevMajor   uint32
	DevMinor   uint32
	Inode      uint64
	Path       string // path as seen inside the process's mount namespace; "" for anonymous
}

// Exec reports whether the mapping is executable.
func (m *Mapping) Exec() bool { return len(m.Perms) > 2 && m.Perms[2] == 'x' }

// IsFile reports whether the mapping is backed by a regular file.
func (m *Mapping) IsFile() bool {
	return m.Inode != 0 && strings.HasPrefix(m.Path, "/")
}

// ID is the (device, inode) pair of the backing file.
func (m *Mapping) ID() FileID {
	return FileID{Dev: uint64(m.DevMajor)<<20 | uint64(m.DevMinor), Inode: m.Inode}
}

// MapsMaxBytes bounds how much of /proc/PID/maps Read reads. The kernel
// bounds the mappings of a process (vm.max_map_count, 65,530 by default),
// not their paths: a process mapping that many files under 4 KiB paths
// lists about 270 MB. 64 MiB is ten times the listing of 65,530 mappings
// of typical 100-byte lines.
var MapsMaxBytes int64 = 64 << 20

// ErrMapsTooLarge is the error (wrapped) of a maps listing over MapsMaxBytes.
var ErrMapsTooLarge = errors.New("a hostile number of mappings or path lengths: not read")

// Read parses /proc/PID/maps. Errors: the process is gone, or its listing
// is over MapsMaxBytes (ErrMapsTooLarge).
func Read(pid int) ([]Mapping, error) {
	data, err := ReadRaw(pid)
	if err != nil {
		return nil, err
	}
	return Parse(data)
}

// MapsTooLargeRetry is how long a process whose listing was over
// MapsMaxBytes is refused at once, without reading: each such read makes
// the kernel print MapsMaxBytes of paths (about 0.5 s of CPU for 64 MiB of
// 3,800-byte paths) while holding the process's mmap lock, and memprof's
// readers (stale-table rescans, stack copies, mapping looks, symbols) would
// otherwise repeat it at their own rates.
const MapsTooLargeRetry = 30 * time.Second

type tooLargeKey struct {
	root string
	pid  int
}

type tooLargeEntry struct {
	start uint64    // the process's start time (StartTime): a reused pid is read
	bound int64     // MapsMaxBytes then: a larger bound reads again
	until time.Time // refused at once until then
}

var tooLarge struct {
	sync.Mutex
	m map[tooLargeKey]tooLargeEntry
}

// refused reports whether pid's listing was found over MapsMaxBytes less
// than MapsTooLargeRetry ago (same process, same bound).
func refused(pid int, now time.Time) bool {
	k := tooLargeKey{ProcRoot, pid}
	tooLarge.Lock()
	e, ok := tooLarge.m[k]
	tooLarge.Unlock()
	if !ok || now.After(e.until) || MapsMaxBytes > e.bound {
		return false
	}
	if start, _ := StartTime(pid); start != e.start {
		return false
	}
	return true
}

// remember notes that pid's listing is over MapsMaxBytes (at most 4,096
// processes are remembered; expired entries go first).
func remember(pid int, now time.Time) {
	start, _ := StartTime(pid)
	tooLarge.Lock()
	defer tooLarge.Unlock()
	if tooLarge.m == nil {
		tooLarge.m = map[tooLargeKey]tooLargeEntry{}
	}
	if len(tooLarge.m) >= 4096 {
		for k, e := range tooLarge.m {
			if now.After(e.until) {
				delete(tooLarge.m, k)
			}
		}
		if len(tooLarge.m) >= 4096 {
			return
		}
	}
	tooLarge.m[tooLargeKey{ProcRoot, pid}] = tooLargeEntry{start: start, bound: MapsMaxBytes, until: now.Add(MapsTooLargeRetry)}
}

// ReadRaw returns the text of /proc/PID/maps, at most MapsMaxBytes of it.
// Errors: the process is gone, or its listing is over MapsMaxBytes
// (ErrMapsTooLarge, nothing returned; for MapsTooLargeRetry after that,
// the same process is refused at once, without reading).
func ReadRaw(pid int) ([]byte, error) {
	now := time.Now()
	if refused(pid, now) {
		return nil, fmt.Errorf("maps of process %d: over %d bytes less than %v ago: %w", pid, MapsMaxBytes, MapsTooLargeRetry, ErrMapsTooLarge)
	}
	path := filepath.Join(ProcRoot, strconv.Itoa(pid), "maps")
	f, err := os.Open(path)
	if err == nil {
		var data []byte
		data, err = io.ReadAll(io.LimitReader(f, MapsMaxBytes+1))
		f.Close()
		if err == nil && int64(len(data)) > MapsMaxBytes {
			remember(pid, now)
			return nil, fmt.Errorf("maps of process %d: over %d bytes: %w", pid, MapsMaxBytes, ErrMapsTooLarge)
		}
		if err == nil {
			return data, nil
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("process %d not found (no %s/%d/maps): %w", pid, ProcRoot, pid, err)
	}
	return nil, fmt.Errorf("read maps of process %d: %w", pid, err)
}

// Parse parses the contents of a maps file.
func Parse(data []byte) ([]Mapping, error) {
	var out []Mapping
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		m, err := parseLine(line)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

func parseLine(line string) (Mapping, error) {
	var m Mapping
	// address perms offset dev inode [path]
	f := strings.Fields(line)
	if len(f) < 5 {
		return m, fmt.Errorf("malformed maps line %q", line)
	}
	addr := strings.SplitN(f[0], "-", 2)
	if len(addr) != 2 {
		return m, fmt.Errorf("malformed address range in %q", line)
	}
	var err error
	if m.Start, err = strconv.ParseUint(addr[0], 16, 64); err != nil {
		return m, fmt.Errorf("maps line %q: %w", line, err)
	}
	if m.End, err = strconv.ParseUint(addr[1], 16, 64); err != nil {
		return m, fmt.Errorf("maps line %q: %w", line, err)
	}
	m.Perms = f[1]
	if m.Offset, err = strconv.ParseUint(f[2], 16, 64); err != nil {
		return m, fmt.Errorf("maps line %q: %w", line, err)
	}
	dev := strings.SplitN(f[3], ":", 2)
	if len(dev) == 2 {
		major, _ := strconv.ParseUint(dev[0], 16, 32)
		minor, _ := strconv.ParseUint(dev[1], 16, 32)
		m.DevMajor, m.DevMinor = uint32(major), uint32(minor)
	}
	if m.Inode, err = strconv.ParseUint(f[4], 10, 64); err != nil {
		return m, fmt.Errorf("maps line %q: %w", line, err)
	}
	if len(f) > 5 {
		// The path is everything after the inode column; it may contain
		// spaces. (Searching for the inode's text would stop inside the
		// offset column when the inode is 0, as for [heap].)
		m.Path = strings.TrimSpace(afterFields(line, 5))
		m.Path = strings.TrimSuffix(m.Path, " (deleted)")
	}
	return m, nil
}

// HostPath is the path through which memprof (in the host mount namespace)
// reaches a file that process pid maps at path p.
func HostPath(pid int, p string) string {
	return filepath.Join(ProcRoot, strconv.Itoa(pid), "root", p)
}

// MapFilesPath is /proc/PID/map_files/<start>-<end>: a link to the very file
// process pid maps at m, whatever its path now names.
func MapFilesPath(pid int, m *Mapping) string {
	return filepath.Join(ProcRoot, strconv.Itoa(pid), "map_files", fmt.Sprintf("%x-%x", m.Start, m.End))
}

// RootPath is /proc/PID/root, the root directory of process pid.
func RootPath(pid int) string {
	return filepath.Join(ProcRoot, strconv.Itoa(pid), "root")
}

// Open opens the file behind a mapping of process pid, as a hostile input
// (package targetfs): first through /proc/PID/map_files (the mapped file
// itself, needs CAP_SYS_ADMIN), else by its path confined to the process's
// root (openat2 RESOLVE_IN_ROOT, so an absolute symlink in a container
// cannot lead to a host file). Either way the file is opened non-blocking,
// must be a regular file, and must be the very (device, inode) the process
// maps.
func Open(pid int, m *Mapping) (*os.File, error) {
	if !m.IsFile() {
		return nil, fmt.Errorf("mapping %x-%x is not file backed", m.Start, m.End)
	}
	type cand struct {
		desc string
		open func() (*os.File, error)
	}
	candidates := []cand{
		{MapFilesPath(pid, m), func() (*os.File, error) { return targetfs.Open(MapFilesPath(pid, m)) }},
		{m.Path + " in the root of process " + strconv.Itoa(pid), func() (*os.File, error) { return targetfs.OpenInRoot(RootPath(pid), m.Path) }},
	}
	var errs []error
	for _, c := range candidates {
		f, err := c.open()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		st, err := targetfs.StatOf(f)
		if err != nil {
			f.Close()
			errs = append(errs, err)
			continue
		}
		if st.Inode != m.Inode || st.Major() != m.DevMajor || st.Minor() != m.DevMinor {
			f.Close()
			errs = append(errs, fmt.Errorf("%s is file %x:%x/%d, process %d maps %x:%x/%d",
				c.desc, st.Major(), st.Minor(), st.Inode, pid, m.DevMajor, m.DevMinor, m.Inode))
			continue
		}
		return f, nil
	}
	return nil, fmt.Errorf("open %s of process %d: %w", m.Path, pid, errors.Join(errs...))
}

// Processes lists the pids in ProcRoot.
func Processes() ([]int, error) {
	ents, err := os.ReadDir(ProcRoot)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Comm returns the command name of pid ("" if gone).
func Comm(pid int) string {
	b, err := os.ReadFile(filepath.Join(ProcRoot, strconv.Itoa(pid), "comm"))
	if err != nil {
		return ""
	}
	// The name is the target's to set (prctl PR_SET_NAME): control
	// characters are escaped so it cannot reach a terminal or a log raw.
	return escapeControl(strings.TrimSpace(string(b)))
}

// escapeControl quotes control characters and invalid UTF-8 of s as Go
// escapes (\n, \x1b, ...), leaving printable text as it is.
func escapeControl(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsControl(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	q := strconv.QuoteToGraphic(s)
	return q[1 : len(q)-1]
}

// Alive reports whether pid exists and is not a zombie.
func Alive(pid int) bool {
	b, err := os.ReadFile(filepath.Join(ProcRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// state follows the ") " that closes comm
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

// afterFields returns what follows the first n space-separated fields of line.
func afterFields(line string, n int) string {
	rest := line
	for i := 0; i < n; i++ {
		rest = strings.TrimLeft(rest, " \t")
		j := strings.IndexAny(rest, " \t")
		if j < 0 {
			return ""
		}
		rest = rest[j:]
	}
	return rest
}
