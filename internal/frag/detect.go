// Package frag judges heap fragmentation: how much of a process's (or a
// cgroup's) anonymous resident memory is not held by live allocations. It
// finds which allocator a process uses, reads the process's memory figures
// from /proc, and turns RSS and live bytes into a verdict with concrete
// advice, Redis MEMORY DOCTOR style: ratio = RSS / live, alarm only when the
// ratio is above AlarmRatio and the excess above AlarmExcess.
package frag

import (
	"debug/elf"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
)

// Allocator names the heap implementation of a process.
type Allocator string

// Allocators memprof recognises. Only the malloc implementations (glibc,
// jemalloc, tcmalloc) are covered by the fragmentation ratio.
const (
	Glibc    Allocator = "glibc"
	Jemalloc Allocator = "jemalloc"
	Tcmalloc Allocator = "tcmalloc"
	Mimalloc Allocator = "mimalloc"
	Go       Allocator = "go"
	JVM      Allocator = "jvm"
	V8       Allocator = "v8"
	Python   Allocator = "python"
	Unknown  Allocator = "unknown"
)

// DetectAllocator tells which allocator manages the heap of process pid from
// its memory map (procmaps.Read(pid); read here when maps is nil) and its
// executable. detail is the library or executable that decided (path as the
// process sees it). Managed runtimes win over the malloc they sit on (a JVM
// or Go program is judged by its own heap); jemalloc and tcmalloc win over
// glibc, whose libc.so.6 every dynamic program maps.
func DetectAllocator(pid int, maps []procmaps.Mapping) (Allocator, string) {
	if maps == nil {
		maps, _ = procmaps.Read(pid)
	}
	var exe string
	exePath := filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "exe")
	if t, err := os.Readlink(exePath); err == nil {
		exe = strings.TrimSuffix(t, " (deleted)")
	}
	found := map[Allocator]string{}
	for i := range maps {
		m := &maps[i]
		if !m.IsFile() {
			continue
		}
		base := filepath.Base(m.Path)
		var a Allocator
		switch {
		case strings.HasPrefix(base, "libjvm.so"):
			a = JVM
		case strings.HasPrefix(base, "libnode.so"):
			a = V8
		case strings.HasPrefix(base, "libpython"):
			a = Python
		case strings.HasPrefix(base, "libjemalloc"):
			a = Jemalloc
		case strings.HasPrefix(base, "libtcmalloc"):
			a = Tcmalloc
		case strings.HasPrefix(base, "libmimalloc"):
			a = Mimalloc
		case base == "libc.so.6":
			a = Glibc
		default:
			continue
		}
		if _, ok := found[a]; !ok {
			found[a] = m.Path
		}
	}
	if exe != "" {
		base := filepath.Base(exe)
		switch {
		case base == "node" || base == "nodejs":
			found[V8] = exe
		case strings.HasPrefix(base, "python"):
			found[Python] = exe
		case base == "java":
			if _, ok := found[JVM]; !ok {
				found[JVM] = exe
			}
		}
		goBin, static := exeTraits(exePath)
		if goBin {
			found[Go] = exe
		}
		if static != "" {
			if _, ok := found[static]; !ok {
				found[static] = exe
			}
		}
	}
	for _, a := range []Allocator{JVM, V8, Python, Go, Jemalloc, Tcmalloc, Mimalloc, Glibc} {
		if d, ok := found[a]; ok {
			return a, d
		}
	}
	if exe != "" {
		return Unknown, exe
	}
	return Unknown, ""
}

// exeTraits inspects the executable at path: goBin when it was built by Go
// (a .go.buildinfo section, or a runtime.main symbol), and static, the
// allocator linked into it when it defines jemalloc's mallctl (also with the
// je_ or Rust jemallocator _rjem_ prefix, or <prefix>mallocx), tcmalloc's
// tc_malloc or mimalloc's mi_malloc.
func exeTraits(path string) (goBin bool, static Allocator) {
	fd, err := targetfs.Open(path)
	if err != nil {
		return false, ""
	}
	defer fd.Close()
	f, err := targetfs.NewELF(fd) // a target's file: sizes checked before reading
	if err != nil {
		return false, ""
	}
	defer func() {
		if recover() != nil { // a malformed executable only loses its traits
			goBin, static = false, ""
		}
	}()
	goBin = f.Section(".go.buildinfo") != nil
	dyn, _ := f.DynamicSymbols()
	syms, _ := f.Symbols()
	for _, list := range [][]elf.Symbol{dyn, syms} {
		for _, s := range list {
			if s.Section == elf.SHN_UNDEF {
				continue
			}
			switch s.Name {
			case "runtime.main":
				goBin = true
			case "mallctl", "je_mallctl", "_rjem_mallctl":
				static = Jemalloc
			case "tc_malloc":
				if static == "" {
					static = Tcmalloc
				}
			case "mi_malloc":
				if static == "" {
					static = Mimalloc
				}
			default:
				// jemalloc under another prefix: <prefix>mallocx.
				if strings.HasSuffix(s.Name, "mallocx") && elf.ST_TYPE(s.Info) == elf.STT_FUNC {
					static = Jemalloc
				}
			}
		}
	}
	return goBin, static
}
