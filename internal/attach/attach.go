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

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
)

// Programs are the loaded BPF programs to attach: one entry program per kind,
// the shared return program (a uretprobe), and the programs for ret
// instructions and tail jumps.
type Programs struct {
	Enter    map[Kind]*ebpf.Program
	Return   *ebpf.Program
	RetSite  *ebpf.Program
	TailSite *ebpf.Program
	// Multi and MultiReturn, when set (Linux 6.6+), attach all probes of
	// an object for a process as two uprobe_multi links, what each probe
	// is passed as its cookie.
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
	// Allocator names the allocator family: "glibc", "jemalloc",
	// "tcmalloc", "mimalloc", "musl", "libstdc++" (operator new/delete over
	// another allocator), "malloc-library" (another library exporting
	// malloc and free) or "static" (an allocator linked into the
	// executable).
	Allocator string
}

// Forwarding reports whether the object's Forwards sites are probed at
// their entry only, the block recorded at the return of the allocation
// they forward to: libstdc++, whose operator new variants call malloc (or
// aligned_alloc, or another operator new) through the PLT — the process's
// malloc, defined by an object memprof probes (every object exporting
// malloc and free is one; calls whose allocation is never seen are counted,
// forward_unseen). An allocator's own operator new (jemalloc, tcmalloc,
// mimalloc) allocates inline and keeps its ret probes.
func (o *Object) Forwarding() bool { return o.Allocator == "libstdc++" }

// Plan counts how an object's functions are probed.
type Plan struct {
	Functions int // functions probed (thunks excluded)
	Emulated  int // of which at an instruction the kernel emulates (one trap per call)
	Forwarded int // of which probed at their entry only, their block recorded at the callee's return
	RetSites  int // of which results are taken at ret instructions
	Rets      int // those ret instructions (each single-stepped on every call)
}

// Plan counts how the object's functions are probed.
func (o *Object) Plan() Plan {
	var p Plan
	p.Functions, p.Emulated = o.Probed()
	for _, s := range o.Sites {
		switch {
		case s.Thunk || !s.Kind.Returns():
		case s.Forwards && o.Forwarding():
			p.Forwarded++
		case s.RetSites:
			p.RetSites++
			p.Rets += len(s.Rets)
		}
	}
	return p
}

// String is the plan for the record summary.
func (p Plan) String() string {
	s := fmt.Sprintf("%d functions, %d at emulated instructions", p.Functions, p.Emulated)
	if p.Forwarded > 0 {
		s += fmt.Sprintf(", %d entry-only (forward to malloc)", p.Forwarded)
	}
	if p.RetSites > 0 {
		s += fmt.Sprintf(", %d with results at %d ret instructions (single-stepped)", p.RetSites, p.Rets)
	}
	return s
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
	// AllRetSites takes the result of every allocating function at its
	// ret instructions, not only of those that may throw (for measuring
	// what return probes save: `make bench`).
	AllRetSites bool

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
		return nil, fmt.Errorf("process %d (%s): %w: it maps none of glibc's libc.so.6, jemalloc, tcmalloc, mimalloc, musl, or an executable with malloc/free (or a prefixed jemalloc) linked in; a static executable stripped of its symbol table hides its malloc (Go, JVM and other runtimes with their own heaps are not covered)", pid, procmaps.Comm(pid), ErrNoAllocator)
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
	fam := ""
	for _, s := range sites {
		for _, n := range s.Names() {
			has[n] = true
		}
		if s.Family != "" && !s.Thunk {
			fam = s.Family
		}
	}
	base := filepath.Base(path)
	switch {
	case strings.HasPrefix(base, "libjemalloc"):
		return "jemalloc"
	case fam != "":
		// tcmalloc, mimalloc, or a jemalloc built with a symbol prefix
		// (linked into the executable, as Redis and Rust programs do).
		return fam
	case (strings.HasPrefix(base, "ld-musl") || strings.HasPrefix(base, "libc.musl") || (base == "libc.so" && strings.Contains(path, "musl"))) && has["malloc"] && has["free"]:
		return "musl"
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

// probe is one uprobe of an object: its file offset and its cookie (enum
// probe_cookie of bpf/memprof.h).
type probe struct {
	off, cookie uint64
	site        Site // the function it belongs to
}

// Cookie fields (bpf/memprof.h).
const (
	cookieWrapper  = uint64(mbpf.MemprofProbeCookieP_WRAPPER)
	cookieRetSites = uint64(mbpf.MemprofProbeCookieP_RETSITES)
	cookieForward  = uint64(mbpf.MemprofProbeCookieP_FORWARD)
	cookieSiteRet  = uint64(mbpf.MemprofProbeCookieSITE_RET)
	cookieSiteTail = uint64(mbpf.MemprofProbeCookieSITE_TAIL)
	cookieOffShift = uint64(mbpf.MemprofProbeCookieCOOKIE_OFF_SHIFT)
	cookieSizeShft = uint64(mbpf.MemprofProbeCookieCOOKIE_SIZE_SHIFT)
)

// probes lists the object's uprobes, each address once: the entries of
// functions whose result a return probe takes (entries; returns lists the
// same functions for the return probe), and the probes that must never
// share an address with a consumer that has a return handler (plain): the
// entries of functions whose result is taken at their ret instructions,
// those ret instructions, and tail jumps. The kernel prepares a return
// probe for every consumer with a return handler at a breakpoint, whatever
// process the consumer is filtered to (a session consumer of another
// process asks for it too): a session or return link of any process at
// operator new's entry would hijack this process's return address.
func (a *Attacher) probes(obj *Object) (entries, plain, returns []probe) {
	seen := map[uint64]bool{}
	for _, s := range obj.Sites {
		if s.Thunk {
			continue
		}
		off := a.siteOffset(s)
		c := uint64(s.Kind) | (off-s.FileOffset)<<cookieOffShift | min(s.Size, 0xffffffff)<<cookieSizeShft
		if wrapper(obj, s) {
			c |= cookieWrapper
		}
		seen[off] = true
		if s.Forwards && obj.Forwarding() {
			// Entry only, in the link without return handler: the
			// function may throw.
			plain = append(plain, probe{off: off, cookie: c | cookieForward, site: s})
			continue
		}
		if a.retSites(s) {
			plain = append(plain, probe{off: off, cookie: c | cookieRetSites, site: s})
			continue
		}
		entries = append(entries, probe{off: off, cookie: c, site: s})
		if s.Kind.Returns() {
			returns = append(returns, probe{off: off, site: s})
		}
	}
	for _, s := range obj.Sites {
		if s.Thunk || !a.retSites(s) || s.Forwards && obj.Forwarding() {
			continue
		}
		for _, r := range s.Rets {
			if !seen[r] {
				seen[r] = true
				plain = append(plain, probe{off: r, cookie: cookieSiteRet, site: s})
			}
		}
	}
	for _, s := range obj.Sites {
		if s.Thunk {
			continue
		}
		for _, t := range s.Tails {
			if !seen[t] {
				seen[t] = true
				plain = append(plain, probe{off: t, cookie: cookieSiteTail, site: s})
			}
		}
	}
	return entries, plain, returns
}

func (a *Attacher) retSites(s Site) bool {
	return s.RetSites || a.AllRetSites && s.Kind.Returns()
}

func offsetsAndCookies(lists ...[]probe) (offs, cookies []uint64) {
	for _, l := range lists {
		for _, p := range l {
			offs = append(offs, p.off)
			cookies = append(cookies, p.cookie)
		}
	}
	return offs, cookies
}

// attachMulti attaches all sites of the object as one entry (entries, ret
// instructions, tail jumps) and one return uprobe_multi link. It returns nil
// links (and no error) when the kernel or the programs do not support it, so
// the caller falls back to one perf event per probe.
func (a *Attacher) attachMulti(ex *link.Executable, pid int, obj *Object) ([]link.Link, error) {
	if a.progs.Multi == nil || a.progs.MultiReturn == nil {
		return nil, nil
	}
	entries, plain, returns := a.probes(obj)
	addrs, cookies := offsetsAndCookies(entries, plain)
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
	if len(returns) > 0 {
		retAddrs, _ := offsetsAndCookies(returns)
		ret, err := ex.UretprobeMulti(nil, a.progs.MultiReturn, &link.UprobeMultiOptions{Addresses: retAddrs, PID: uint32(pid)})
		if err != nil {
			enter.Close()
			return nil, attachError(pid, obj, Site{Symbol: "uretprobe_multi"}, err)
		}
		links = append(links, ret)
	}
	return links, nil
}

// attachEach attaches one perf-event uprobe per probe (and a uretprobe per
// function that needs one).
func (a *Attacher) attachEach(ex *link.Executable, pid int, obj *Object) ([]link.Link, error) {
	var links []link.Link
	fail := func(err error) ([]link.Link, error) {
		closeAll(links)
		return nil, err
	}
	entries, plain, returns := a.probes(obj)
	add := func(prog *ebpf.Program, p probe, ret bool) error {
		if prog == nil {
			return fmt.Errorf("no BPF program for %s", p.site.Kind)
		}
		opts := &link.UprobeOptions{Address: p.off, PID: pid, Cookie: p.cookie}
		attachFn := ex.Uprobe
		if ret {
			attachFn = ex.Uretprobe
		}
		l, err := attachFn(p.site.Symbol, prog, opts)
		if err != nil {
			return attachError(pid, obj, p.site, err)
		}
		links = append(links, l)
		return nil
	}
	for _, p := range append(entries, plain...) {
		prog := a.progs.Enter[p.site.Kind]
		switch p.cookie & uint64(mbpf.MemprofProbeCookieSITE_MASK) {
		case cookieSiteRet:
			prog = a.progs.RetSite
		case cookieSiteTail:
			prog = a.progs.TailSite
		}
		if err := add(prog, p, false); err != nil {
			return fail(err)
		}
	}
	for _, p := range returns {
		if err := add(a.progs.Return, p, true); err != nil {
			return fail(err)
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
