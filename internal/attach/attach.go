package attach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
)

// Programs are the loaded BPF programs to attach: one entry program per kind
// and the shared return program.
type Programs struct {
	Enter  map[Kind]*ebpf.Program
	Return *ebpf.Program
	// Multi and MultiReturn, when set (Linux 6.6+), attach all probes of
	// an object for a process as two uprobe_multi links, the kind passed
	// as each probe's cookie.
	Multi, MultiReturn *ebpf.Program
	// Session, when set (Linux 6.13+), attaches all probes of an object
	// for a process as one uprobe session link; preferred over Multi.
	Session *ebpf.Program
}

// Object is an allocator object (library or executable) and its probe sites.
type Object struct {
	ID    procmaps.FileID
	Path  string // as the target maps it
	Sites []Site
	// Allocator names the allocator family: "glibc", "jemalloc", "libstdc++"
	// (operator new/delete over another allocator) or "static" (an allocator
	// linked into the executable).
	Allocator string
}

// Probed counts the sites that get probes (thunks excluded).
func (o *Object) Probed() (entries, emulated int) {
	for _, s := range o.Sites {
		if s.Thunk {
			continue
		}
		entries++
		if s.Emulated {
			emulated++
		}
	}
	return
}

// Attacher attaches the programs to the allocator objects of target
// processes. Each object file is parsed once per (device, inode) whatever
// the path or process it was reached through; probes are per process (the
// kernel only plants breakpoints in the targets' address spaces).
type Attacher struct {
	progs Programs
	// EntryOnly places every probe at the function's first instruction
	// instead of the chosen emulated site (for measuring what the site
	// choice saves).
	EntryOnly bool

	mu      sync.Mutex
	objects map[procmaps.FileID]*objectEntry
	procs   map[int]*procState
}

type objectEntry struct {
	obj *Object // nil when the file is not an allocator
	err error
}

type procState struct {
	files map[procmaps.FileID]bool
	links []link.Link
}

// New returns an Attacher for the loaded programs.
func New(p Programs) *Attacher {
	return &Attacher{progs: p, objects: map[procmaps.FileID]*objectEntry{}, procs: map[int]*procState{}}
}

// ErrNoAllocator is returned when a process maps no allocator memprof knows.
var ErrNoAllocator = errors.New("no allocator found")

// Process attaches to every allocator object process pid maps that is not
// attached yet (call it again to pick up libraries loaded later with
// dlopen). It returns the objects newly attached.
func (a *Attacher) Process(pid int) ([]*Object, error) {
	maps, err := procmaps.Read(pid)
	if err != nil {
		return nil, err
	}
	var added []*Object
	seen := map[procmaps.FileID]bool{}
	for i := range maps {
		m := &maps[i]
		if !m.Exec() || !m.IsFile() || seen[m.ID()] {
			continue
		}
		seen[m.ID()] = true
		if a.attachedTo(pid, m.ID()) {
			continue
		}
		obj, err := a.object(m.ID(), m.Path, func() (*os.File, error) { return procmaps.Open(pid, m) })
		if err != nil {
			return added, err
		}
		if obj == nil {
			continue
		}
		// The kernel resolves the path given for the uprobe: /proc/PID/map_files
		// leads to the mapped file itself; the path through the process's root
		// could follow a symlink the target planted to another file.
		if err := a.attach(pid, obj, procmaps.MapFilesPath(pid, m), procmaps.HostPath(pid, m.Path)); err != nil {
			return added, err
		}
		added = append(added, obj)
	}
	if len(added) == 0 && !a.hasAny(pid) {
		return nil, fmt.Errorf("process %d (%s): %w: it maps none of glibc's libc.so.6, libjemalloc.so.2 or an executable with malloc/free linked in (Go, JVM and other runtimes with their own heaps are not covered)", pid, procmaps.Comm(pid), ErrNoAllocator)
	}
	return added, nil
}

// Files attaches to objects given by host path for process pid before they
// are mapped: used to start a command with the probes in place (the kernel
// plants the breakpoints when the process maps the file after exec).
func (a *Attacher) Files(pid int, paths []string) ([]*Object, error) {
	var added []*Object
	for _, p := range paths {
		id, err := procmaps.StatID(p)
		if err != nil {
			return added, fmt.Errorf("stat %s: %w", p, err)
		}
		if a.attachedTo(pid, id) {
			continue
		}
		obj, err := a.object(id, p, func() (*os.File, error) { return targetfs.Open(p) })
		if err != nil {
			return added, err
		}
		if obj == nil {
			continue
		}
		if err := a.attach(pid, obj, p, ""); err != nil {
			return added, err
		}
		added = append(added, obj)
	}
	return added, nil
}

func (a *Attacher) attachedTo(pid int, id procmaps.FileID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	ps := a.procs[pid]
	return ps != nil && ps.files[id]
}

func (a *Attacher) hasAny(pid int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	ps := a.procs[pid]
	return ps != nil && len(ps.files) > 0
}

// object returns the parsed allocator object for a file, parsing it on
// first sight; nil (and no error) when the file defines no allocator.
func (a *Attacher) object(id procmaps.FileID, path string, open func() (*os.File, error)) (*Object, error) {
	a.mu.Lock()
	if e, ok := a.objects[id]; ok {
		a.mu.Unlock()
		return e.obj, e.err
	}
	a.mu.Unlock()

	obj, err := parseObject(id, path, open)
	a.mu.Lock()
	a.objects[id] = &objectEntry{obj: obj, err: err}
	a.mu.Unlock()
	return obj, err
}

func parseObject(id procmaps.FileID, path string, open func() (*os.File, error)) (*Object, error) {
	f, err := open()
	if err != nil {
		// An object we cannot read is not an allocator we can probe; the
		// caller reports "no allocator" if nothing else is found.
		return nil, nil
	}
	// The file is a target's: its headers are checked before any section is
	// read, and a malformed one can neither panic nor stall the caller.
	var sites []Site
	err = targetfs.Guard(path, 0, func() error {
		defer f.Close()
		ef, err := targetfs.NewELF(f)
		if err != nil {
			return nil // not an ELF object we can read: no allocator
		}
		sites, err = FindSites(ef)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("find allocator functions in %s: %w", path, err)
	}
	if len(sites) == 0 {
		return nil, nil
	}
	obj := &Object{ID: id, Path: path, Sites: sites, Allocator: allocatorName(path, sites)}
	if obj.Allocator == "" {
		return nil, nil
	}
	return obj, nil
}

// allocatorName classifies an object by what it exports. A library that
// defines only a stray allocator-named symbol but not malloc and free is
// ignored, except libstdc++'s operator new/delete.
func allocatorName(path string, sites []Site) string {
	has := map[string]bool{}
	for _, s := range sites {
		has[s.Symbol] = true
	}
	base := filepath.Base(path)
	switch {
	case strings.HasPrefix(base, "libjemalloc"):
		return "jemalloc"
	case strings.HasPrefix(base, "libc.so") || strings.HasPrefix(base, "libc-"):
		return "glibc"
	case strings.HasPrefix(base, "libstdc++"):
		if has["_Znwm"] {
			return "libstdc++"
		}
		return ""
	case has["malloc"] && has["free"]:
		if has["mallocx"] {
			return "jemalloc"
		}
		if strings.HasSuffix(base, ".so") || strings.Contains(base, ".so.") {
			return "malloc-library"
		}
		return "static"
	}
	return ""
}

// attach plants the probes of one object for one process. path is how the
// kernel finds the file (through the process's root); alt, if set, is tried
// when path does not lead to the same file.
func (a *Attacher) attach(pid int, obj *Object, path, alt string) error {
	ex, err := link.OpenExecutable(path)
	if err != nil && alt != "" {
		ex, err = link.OpenExecutable(alt)
	}
	if err != nil {
		return fmt.Errorf("open %s for uprobes: %w", obj.Path, err)
	}
	links, err := a.attachSession(path, pid, obj)
	if err != nil && alt != "" {
		links, err = a.attachSession(alt, pid, obj)
	}
	if err != nil {
		return err
	}
	if links == nil {
		links, err = a.attachMulti(ex, pid, obj)
		if err != nil {
			return err
		}
	}
	if links == nil {
		links, err = a.attachEach(ex, pid, obj)
		if err != nil {
			return err
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	ps := a.procs[pid]
	if ps == nil {
		ps = &procState{files: map[procmaps.FileID]bool{}}
		a.procs[pid] = ps
	}
	ps.files[obj.ID] = true
	ps.links = append(ps.links, links...)
	return nil
}

func (a *Attacher) siteOffset(s Site) uint64 {
	if a.EntryOnly {
		return s.FileOffset
	}
	return s.FileOffset + s.Offset
}

// attachMulti attaches all sites of the object as one entry and one return
// uprobe_multi link. It returns nil links (and no error) when the kernel or
// the programs do not support it, so the caller falls back to one perf
// event per probe.
func (a *Attacher) attachMulti(ex *link.Executable, pid int, obj *Object) ([]link.Link, error) {
	if a.progs.Multi == nil || a.progs.MultiReturn == nil {
		return nil, nil
	}
	var addrs, cookies, retAddrs []uint64
	for _, s := range obj.Sites {
		if s.Thunk {
			continue
		}
		addrs = append(addrs, a.siteOffset(s))
		cookies = append(cookies, uint64(s.Kind))
		if s.Kind.Returns() {
			retAddrs = append(retAddrs, a.siteOffset(s))
		}
	}
	if len(addrs) == 0 {
		return []link.Link{}, nil
	}
	enter, err := ex.UprobeMulti(nil, a.progs.Multi, &link.UprobeMultiOptions{Addresses: addrs, Cookies: cookies, PID: uint32(pid)})
	if errors.Is(err, ebpf.ErrNotSupported) {
		return nil, nil
	}
	if err != nil {
		return nil, attachError(pid, obj, Site{Symbol: "uprobe_multi"}, err)
	}
	links := []link.Link{enter}
	if len(retAddrs) > 0 {
		ret, err := ex.UretprobeMulti(nil, a.progs.MultiReturn, &link.UprobeMultiOptions{Addresses: retAddrs, PID: uint32(pid)})
		if err != nil {
			enter.Close()
			return nil, attachError(pid, obj, Site{Symbol: "uretprobe_multi"}, err)
		}
		links = append(links, ret)
	}
	return links, nil
}

// attachEach attaches one perf-event uprobe (and uretprobe) per site.
func (a *Attacher) attachEach(ex *link.Executable, pid int, obj *Object) ([]link.Link, error) {
	var links []link.Link
	fail := func(err error) ([]link.Link, error) {
		closeAll(links)
		return nil, err
	}
	for _, s := range obj.Sites {
		if s.Thunk {
			continue
		}
		prog := a.progs.Enter[s.Kind]
		if prog == nil {
			return fail(fmt.Errorf("no BPF program for %s", s.Kind))
		}
		opts := &link.UprobeOptions{Address: a.siteOffset(s), PID: pid}
		l, err := ex.Uprobe(s.Symbol, prog, opts)
		if err != nil {
			return fail(attachError(pid, obj, s, err))
		}
		links = append(links, l)
		if s.Kind.Returns() {
			l, err := ex.Uretprobe(s.Symbol, a.progs.Return, opts)
			if err != nil {
				return fail(attachError(pid, obj, s, err))
			}
			links = append(links, l)
		}
	}
	return links, nil
}

func attachError(pid int, obj *Object, s Site, err error) error {
	hint := ""
	switch {
	case errors.Is(err, os.ErrPermission):
		hint = " (needs root, or CAP_PERFMON and CAP_BPF with CAP_SYS_ADMIN for uprobes)"
	case errors.Is(err, os.ErrNotExist):
		hint = " (process exited, or the kernel lacks CONFIG_UPROBE_EVENTS)"
	}
	return fmt.Errorf("attach uprobe to %s+%#x in %s for process %d: %w%s", s.Symbol, s.Offset, obj.Path, pid, err, hint)
}

// Detach removes the probes of one process.
func (a *Attacher) Detach(pid int) {
	a.mu.Lock()
	ps := a.procs[pid]
	delete(a.procs, pid)
	a.mu.Unlock()
	if ps != nil {
		closeAll(ps.links)
	}
}

// closeAll closes links concurrently: each uprobe removal waits for an
// SRCU grace period in the kernel (~100 ms in a VM), so closing 70 probes
// one after another takes seconds, while the waits overlap when concurrent.
func closeAll(links []link.Link) {
	var wg sync.WaitGroup
	for _, l := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.Close()
		}()
	}
	wg.Wait()
}

// Attached lists the processes with probes, sorted.
func (a *Attacher) Attached() []int {
	a.mu.Lock()
	defer a.mu.Unlock()
	var pids []int
	for pid := range a.procs {
		pids = append(pids, pid)
	}
	sort.Ints(pids)
	return pids
}

// Links counts the probes in place.
func (a *Attacher) Links() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, ps := range a.procs {
		n += len(ps.links)
	}
	return n
}

// Close detaches everything.
func (a *Attacher) Close() {
	a.mu.Lock()
	var links []link.Link
	for pid, ps := range a.procs {
		links = append(links, ps.links...)
		delete(a.procs, pid)
	}
	a.mu.Unlock()
	closeAll(links)
}
