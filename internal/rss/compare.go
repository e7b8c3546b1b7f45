package rss

import (
	"sort"
	"strconv"
	"strings"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/pprofout"
)

// Breakdown splits one process's rss_space by what made it resident.
type Breakdown struct {
	Allocator int64 // faulted under a C/C++ allocator function (malloc & co., operator new, jemalloc)
	Other     int64 // faulted elsewhere: the program touching its blocks or own mappings, runtimes' heaps, stacks
	Before    int64 // [resident before recording]
}

// Regions splits one process's profiled resident bytes by the kind of
// mapping the sampled folios lie in (/proc/PID/maps at the snapshot).
type Regions struct {
	Brk   int64 // [heap]: the brk heap (glibc's main arena)
	Anon  int64 // anonymous mappings: allocator mmaps (big blocks, arenas, jemalloc extents), the program's own, thread stacks, runtimes' heaps
	Stack int64 // [stack]: the main thread's stack
	Data  int64 // private file mappings written to (copy-on-write of .data, MAP_PRIVATE files)
}

// regionOf classifies addr by the mappings (sorted by Start).
func regionOf(maps []procmaps.Mapping, addr uint64) string {
	i := sort.Search(len(maps), func(i int) bool { return maps[i].End > addr })
	if i == len(maps) || maps[i].Start > addr {
		return "anon"
	}
	m := &maps[i]
	switch {
	case m.Path == "[heap]":
		return "brk"
	case m.Path == "[stack]":
		return "stack"
	case m.IsFile():
		return "data"
	}
	return "anon"
}

func (r *Regions) add(kind string, n int64) {
	switch kind {
	case "brk":
		r.Brk += n
	case "stack":
		r.Stack += n
	case "data":
		r.Data += n
	default:
		r.Anon += n
	}
}

// allocatorNames are C allocator entry points and glibc malloc.c internals,
// with their __libc_/__GI_/_int_ prefixes stripped (see allocatorFrame).
var allocatorNames = map[string]bool{
	"malloc": true, "calloc": true, "realloc": true, "reallocarray": true, "memalign": true,
	"posix_memalign": true, "aligned_alloc": true, "valloc": true, "pvalloc": true,
	"sysmalloc": true, "sysmalloc_mmap": true, "mid_memalign": true, "tcache_init": true,
	"malloc_consolidate": true, "mallocx": true, "rallocx": true, "xallocx": true,
}

// allocatorFrame reports whether a function name is a C/C++ allocator's
// (glibc malloc.c, jemalloc — whose internals are all je_-prefixed in
// Debian's build —, libstdc++ operator new).
func allocatorFrame(fn string) bool {
	if strings.HasPrefix(fn, "operator new") || strings.HasPrefix(fn, "je_") {
		return true
	}
	name := strings.TrimLeft(fn, "_")
	for _, p := range []string{"GI_", "libc_", "int_"} {
		name = strings.TrimLeft(strings.TrimPrefix(name, p), "_")
	}
	return allocatorNames[name]
}

// Categorize splits the rss_space of p per process (pid label) into
// allocator-owned, other and before-recording bytes. Unsampling as BuildRSS.
func Categorize(p *pprofout.RSSProfile) map[int]*Breakdown {
	out := map[int]*Breakdown{}
	for _, s := range p.Samples {
		pid, err := strconv.Atoi(s.Labels["pid"])
		if err != nil {
			continue
		}
		b := out[pid]
		if b == nil {
			b = &Breakdown{}
			out[pid] = b
		}
		bytes := int64(s.Resident*float64(s.Size)*scaleOf(s.Size, p.SampleRate)+0.5) + s.ResidentBytes
		alloc, before := false, false
		for _, loc := range s.Stack {
			for _, ln := range loc.Lines {
				if ln.Function == ResidentBefore {
					before = true
				}
				if allocatorFrame(ln.Function) {
					alloc = true
				}
			}
		}
		switch {
		case before:
			b.Before += bytes
		case alloc:
			b.Allocator += bytes
		default:
			b.Other += bytes
		}
	}
	return out
}
