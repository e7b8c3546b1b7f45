package attach

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// attachTypeUprobeSession is BPF_TRACE_UPROBE_SESSION (linux/bpf.h, 6.13+).
// cilium/ebpf v0.22 loads uprobe.session programs but creates uprobe_multi
// links only with the plain attach type, so session links are created here.
const attachTypeUprobeSession = 57

// linkCreateUprobeMulti is the link_create member of union bpf_attr for
// uprobe_multi links (linux/bpf.h).
type linkCreateUprobeMulti struct {
	progFD, targetFD, attachType, flags uint32
	path, offsets, refCtrOffsets        uint64
	cookies                             uint64
	cnt, multiFlags, pid                uint32
	_                                   uint32
}

// wrapper reports whether a site's function calls other allocator entry
// points, so that its calls stay pending to their return and the calls
// nested in them are recognised: glibc's reallocarray calls its realloc.
// (libstdc++'s operator new calls malloc too: like every function that may
// throw it stays pending anyway, until the malloc it forwards to takes the
// call over — P_FORWARD — or its result is taken at its ret instructions.)
func wrapper(obj *Object, s Site) bool {
	return obj.Allocator == "libstdc++" || s.Symbol == "reallocarray"
}

// attachSession attaches the sites of the object for pid as one uprobe
// session link (one program runs at entry and, when the entry asks for it,
// at return) and one uprobe_multi link for the probes that must not share
// an address with a return handler. It returns nil links (and no error)
// when there is no session program.
func (a *Attacher) attachSession(path string, pid int, obj *Object) ([]link.Link, error) {
	if a.progs.Session == nil || a.progs.Multi == nil {
		return nil, nil
	}
	entries, plain, _ := a.probes(obj)
	var links []link.Link
	if len(entries) > 0 {
		offsets, cookies := offsetsAndCookies(entries)
		l, err := createSessionLink(a.progs.Session, path, offsets, cookies, pid)
		if err != nil {
			return nil, attachError(pid, obj, Site{Symbol: "uprobe session"}, err)
		}
		links = append(links, l)
	}
	if len(plain) > 0 {
		// Entries of functions whose result is taken at their ret
		// instructions, those instructions and tail jumps: a link without
		// a return handler (see probes).
		ex, err := link.OpenExecutable(path)
		if err == nil {
			var l link.Link
			offsets, cookies := offsetsAndCookies(plain)
			l, err = ex.UprobeMulti(nil, a.progs.Multi, &link.UprobeMultiOptions{Addresses: offsets, Cookies: cookies, PID: uint32(pid)})
			if err == nil {
				links = append(links, l)
			}
		}
		if err != nil {
			closeAll(links)
			return nil, attachError(pid, obj, Site{Symbol: "uprobe_multi"}, err)
		}
	}
	return links, nil
}

func createSessionLink(prog *ebpf.Program, path string, offsets, cookies []uint64, pid int) (link.Link, error) {
	cpath, err := unix.BytePtrFromString(path)
	if err != nil {
		return nil, err
	}
	attr := linkCreateUprobeMulti{
		progFD:     uint32(prog.FD()),
		attachType: attachTypeUprobeSession,
		path:       uint64(uintptr(unsafe.Pointer(cpath))),
		offsets:    uint64(uintptr(unsafe.Pointer(&offsets[0]))),
		cookies:    uint64(uintptr(unsafe.Pointer(&cookies[0]))),
		cnt:        uint32(len(offsets)),
		pid:        uint32(pid),
	}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_LINK_CREATE, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(cpath)
	runtime.KeepAlive(offsets)
	runtime.KeepAlive(cookies)
	if errno != 0 {
		if errors.Is(errno, unix.EINVAL) || errors.Is(errno, unix.EOPNOTSUPP) {
			return nil, fmt.Errorf("create uprobe session link: %w (kernel without uprobe sessions?)", errno)
		}
		return nil, fmt.Errorf("create uprobe session link: %w", errno)
	}
	l, err := link.NewFromFD(int(fd))
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("wrap uprobe session link: %w", err)
	}
	return l, nil
}
