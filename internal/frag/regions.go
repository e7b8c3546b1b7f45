package frag

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/memprof/memprof/internal/procmaps"
)

// Block is a live block the profiler saw: [Addr, Addr+Size).
type Block struct{ Addr, Size uint64 }

// Regions splits a process's anonymous resident memory (smaps Rss of its
// anonymous mappings) by owner, in bytes. Only the allocator's part
// (AllocatorRSS) is compared with live bytes: RSS also holds thread stacks
// and the program's own mmap regions, which no allocator can give back.
type Regions struct {
	BrkHeap     uint64 // [heap]: the brk heap (glibc's main arena, musl, tcmalloc's sbrk)
	GlibcArenas uint64 // glibc's non-main arena heaps (64 MiB-aligned reservations)
	// BlockRegions is allocator memory found through the live blocks seen
	// in it. glibc: the blocks outside its heaps themselves (its mmapped
	// chunks, exactly one block each). Other allocators: every anonymous
	// mapping holding a live block (jemalloc extents, tcmalloc spans,
	// mimalloc segments), wholly, free space included.
	BlockRegions uint64
	Stacks       uint64 // the main [stack] and the thread stacks
	// Other is the rest: the program's own mmap regions, and allocator
	// memory holding no block seen (caches of freed memory, or blocks not
	// sampled). Not compared.
	Other     uint64
	Total     uint64 // all anonymous RSS
	Truncated bool   // smaps was cut at procmaps.SmapsMaxBytes
}

// AllocatorRSS is the resident memory attributed to the allocator.
func (r Regions) AllocatorRSS() uint64 { return r.BrkHeap + r.GlibcArenas + r.BlockRegions }

// String gives the split in words.
func (r Regions) String() string {
	s := fmt.Sprintf("allocator's anonymous RSS %s (brk heap %s, glibc arenas %s, regions holding live blocks %s) of %s; not the allocator's: stacks %s, other mappings %s (the program's own mmap regions, allocator caches holding no block seen)",
		Human(r.AllocatorRSS()), Human(r.BrkHeap), Human(r.GlibcArenas), Human(r.BlockRegions), Human(r.Total), Human(r.Stacks), Human(r.Other))
	if r.Truncated {
		s += fmt.Sprintf("; smaps cut at %s", Human(uint64(procmaps.SmapsMaxBytes)))
	}
	return s
}

// Human formats a byte count with binary units.
func Human(b uint64) string { return human(b) }

// ReadRegions reads /proc/PID/smaps and the stack pointers of its threads
// and classifies its anonymous memory for allocator a, given the live blocks
// seen (sorted or not).
func ReadRegions(pid int, a Allocator, blocks []Block) (Regions, error) {
	sm, err := procmaps.ReadSmaps(pid)
	if err != nil {
		return Regions{}, err
	}
	r := ClassifyRegions(sm.Entries, threadSPs(pid), a, blocks)
	r.Truncated = sm.Truncated
	return r, nil
}

// ClassifyRegions splits the anonymous RSS of smaps entries (see Regions).
// sps are the threads' stack pointers: a mapping holding one is a stack.
// Without them a writable mapping right above an inaccessible one (the
// guard page glibc puts below every thread stack) is taken for a stack.
func ClassifyRegions(entries []procmaps.SmapsEntry, sps []uint64, a Allocator, blocks []Block) Regions {
	var r Regions
	sorted := append([]Block(nil), blocks...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Addr < sorted[j].Addr })
	maps := make([]procmaps.Mapping, len(entries))
	for i := range entries {
		maps[i] = entries[i].Mapping
	}
	arenas := glibcArenaSet(maps)
	for i := range entries {
		e := &entries[i]
		m := &e.Mapping
		if !anonymous(m) && m.Path != "[heap]" && m.Path != "[stack]" {
			continue
		}
		rss := e.Rss
		r.Total += rss
		switch {
		case m.Path == "[heap]":
			r.BrkHeap += rss
		case m.Path == "[stack]" || holdsSP(m, sps) || (i > 0 && guardBelow(&entries[i-1].Mapping, m) && !arenas[i]):
			r.Stacks += rss
		case arenas[i] && a != Go:
			r.GlibcArenas += rss
		default:
			in := blocksIn(sorted, m.Start, m.End)
			switch {
			case in == 0:
				r.Other += rss
			case a == Glibc:
				n := min(in, rss)
				r.BlockRegions += n
				r.Other += rss - n
			default:
				r.BlockRegions += rss
			}
		}
	}
	return r
}

// blocksIn sums the bytes of blocks starting in [start, end), clipped to it.
func blocksIn(sorted []Block, start, end uint64) uint64 {
	i := sort.Search(len(sorted), func(i int) bool { return sorted[i].Addr >= start })
	var n uint64
	for ; i < len(sorted) && sorted[i].Addr < end; i++ {
		n += min(sorted[i].Size, end-sorted[i].Addr)
	}
	return n
}

func holdsSP(m *procmaps.Mapping, sps []uint64) bool {
	for _, sp := range sps {
		if sp >= m.Start && sp < m.End {
			return true
		}
	}
	return false
}

// guardBelow: lo is an inaccessible anonymous mapping ending where m, a
// writable one, starts: glibc's thread stack layout (guard page below).
func guardBelow(lo, m *procmaps.Mapping) bool {
	return anonymous(lo) && strings.HasPrefix(lo.Perms, "---") && lo.End == m.Start && strings.HasPrefix(m.Perms, "rw") && lo.End-lo.Start <= 1<<20
}

// glibcArenaSet marks the mappings that belong to a glibc arena heap (see
// CountGlibcArenas).
func glibcArenaSet(maps []procmaps.Mapping) map[int]bool {
	set := map[int]bool{}
	for i := 0; i < len(maps); i++ {
		m := &maps[i]
		if !anonymous(m) || m.Start%GlibcHeapMax != 0 || !strings.HasPrefix(m.Perms, "rw") {
			continue
		}
		want := m.Start + GlibcHeapMax
		end := m.End
		j := i + 1
		for end < want && j < len(maps) && maps[j].Start == end && anonymous(&maps[j]) {
			end = maps[j].End
			j++
		}
		if end == want {
			for k := i; k < j; k++ {
				set[k] = true
			}
			i = j - 1
		}
	}
	return set
}

// threadSPs reads the stack pointer of every thread of pid blocked in a
// system call (/proc/PID/task/TID/syscall: "nr args... sp pc"), at most
// 10,000 threads.
func threadSPs(pid int) []uint64 {
	dir := filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid), "task")
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var sps []uint64
	for i, t := range tasks {
		if i >= 10000 {
			break
		}
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "syscall"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) == 9 {
			if sp, err := strconv.ParseUint(strings.TrimPrefix(f[7], "0x"), 16, 64); err == nil {
				sps = append(sps, sp)
			}
		}
	}
	return sps
}

// WritableAnon sums the sizes of a process's writable anonymous mappings
// (brk heap included, the main stack not): every block its allocator had
// handed out lies in them, so it bounds the bytes of blocks allocated
// before a profiler attached.
func WritableAnon(maps []procmaps.Mapping) uint64 {
	var n uint64
	for i := range maps {
		m := &maps[i]
		if (anonymous(m) || m.Path == "[heap]") && strings.HasPrefix(m.Perms, "rw") {
			n += m.End - m.Start
		}
	}
	return n
}
