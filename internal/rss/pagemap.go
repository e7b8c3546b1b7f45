package rss

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
)

// /proc/PID/pagemap: one little-endian 64-bit entry per virtual page
// (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63 // page present in RAM
	pmSwapped = 1 << 62 // page swapped out
	pmFile    = 1 << 61 // file page or shared anonymous page
	pageSize  = 4096
	// maxPagemapRead bounds one read (entries for 64 MiB of address space).
	maxPagemapRead = 128 << 10
)

// residency is what pagemap says about one sampled folio now.
type residency struct {
	present int // pages present and anonymous (not file or shared)
	swapped int // pages swapped out
	pages   int // pages in the folio
}

// fraction is the part of the sampled folio still resident (more than 1
// when the sampled page belongs to a transparent huge page: its fault made
// the whole huge page resident).
func (r residency) fraction() float64 {
	if r.pages == 0 {
		return 0
	}
	return float64(r.present) / float64(r.pages)
}

// gone reports whether nothing of the folio is left (neither resident nor
// swapped out): its entry can be forgotten.
func (r residency) gone() bool { return r.present == 0 && r.swapped == 0 }

// folio is a sampled folio's range in a process.
type folio struct {
	addr, size uint64
	fault      uint64 // faulting address (0: addr)
}

// pfnMask selects the page frame number of a present entry (bits 0-54).
const pfnMask = 1<<55 - 1

// kpageflags bit of a page that is part of a transparent huge page
// (Documentation/admin-guide/mm/pagemap.rst: KPF_THP).
const kpfTHP = 1 << 22

// thpSize is the x86-64 PMD-mapped huge page size.
const thpSize = 2 << 20

// classifyTHP decides from /proc/kpageflags which range each sampled folio
// really is. A 4 KiB sample that is part of a transparent huge page is
// widened to the huge page (the fault made it all resident: units of the
// sampled size, up to 512). A sample expected as a 2 MiB huge page that the
// kernel mapped with 4 KiB pages (no huge page free, a page table already
// there) is narrowed to its faulting page (1/512 of the sampled size). It
// returns the ranges to check and the denominators of their fractions.
func classifyTHP(pm interface {
	ReadAt([]byte, int64) (int, error)
}, folios []folio) ([]folio, []int) {
	out := make([]folio, len(folios))
	denom := make([]int, len(folios))
	kf, kerr := os.Open("/proc/kpageflags")
	thp := make([]bool, len(folios))
	if kerr == nil {
		defer kf.Close()
		// The pagemap entries of the faulting pages, then the page flags
		// of the present ones: both read in merged runs.
		idx := make([]uint64, len(folios))
		for i, fo := range folios {
			f := fo.fault
			if f == 0 {
				f = fo.addr
			}
			idx[i] = f / pageSize
		}
		ents := readEntries(pm, idx, 64)
		var pfns []uint64
		var who []int
		for i, e := range ents {
			if e&pmPresent != 0 && e&pfnMask != 0 {
				pfns = append(pfns, e&pfnMask)
				who = append(who, i)
			}
		}
		for j, fl := range readEntries(kf, pfns, 4) {
			thp[who[j]] = fl&kpfTHP != 0
		}
	}
	isTHP := func(i int) bool { return thp[i] }
	for i, fo := range folios {
		out[i], denom[i] = fo, 0 // 0: the folio's own pages
		fault := fo.fault
		if fault == 0 {
			fault = fo.addr
		}
		switch {
		case fo.size == pageSize && isTHP(i):
			out[i] = folio{addr: fault &^ (thpSize - 1), size: thpSize}
			denom[i] = 1
		case fo.size == thpSize && kerr == nil && !isTHP(i):
			out[i] = folio{addr: fault &^ (pageSize - 1), size: pageSize}
			denom[i] = thpSize / pageSize
		}
	}
	return out, denom
}

// checkResidency reads /proc/PID/pagemap for each folio (sorted and merged
// into runs, each read at most maxPagemapRead bytes) and returns their
// residency in the order given. It fails only when pagemap cannot be opened
// (the process has exited).
func checkResidency(pid int, folios []folio) ([]residency, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ranges, denom := classifyTHP(f, folios)
	res := residencyFrom(f, ranges)
	for i := range res {
		if denom[i] != 0 {
			res[i].pages = denom[i] // fractions in units of the sampled size
		}
	}
	return res, nil
}

// residencyFrom is checkResidency over any reader of pagemap entries.
func residencyFrom(r interface {
	ReadAt([]byte, int64) (int, error)
}, folios []folio) []residency {
	out := make([]residency, len(folios))
	order := make([]int, len(folios))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return folios[order[a]].addr < folios[order[b]].addr })
	buf := make([]byte, 0, 4096)
	for i := 0; i < len(order); {
		// A run of folios whose entries lie within one bounded read.
		start := folios[order[i]].addr / pageSize
		end := start
		j := i
		for ; j < len(order); j++ {
			fo := folios[order[j]]
			first, last := fo.addr/pageSize, (fo.addr+max(fo.size, pageSize))/pageSize
			if first < start || (last-start)*8 > maxPagemapRead {
				break
			}
			end = max(end, last)
		}
		if j == i { // a folio larger than one read (cannot happen with sizes <= 64 MiB)
			j = i + 1
			fo := folios[order[i]]
			end = start + min(max(fo.size, pageSize), maxPagemapRead*pageSize/8)/pageSize
		}
		n := int(end-start) * 8
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		got, _ := r.ReadAt(buf, int64(start*8))
		for _, idx := range order[i:j] {
			fo := folios[idx]
			first := fo.addr / pageSize
			pages := int(max(fo.size, pageSize) / pageSize)
			res := residency{pages: pages}
			for p := 0; p < pages; p++ {
				off := int(first-start+uint64(p)) * 8
				if off+8 > got {
					break
				}
				e := binary.LittleEndian.Uint64(buf[off:])
				switch {
				case e&pmPresent != 0 && e&pmFile == 0:
					res.present++
				case e&pmSwapped != 0:
					res.swapped++
				}
			}
			out[idx] = res
		}
		i = j
	}
	return out
}

// readEntries reads the 8-byte entries at the given indexes of r (pagemap
// by page number, kpageflags by page frame number), sorted and merged into
// runs of nearby entries of at most maxPagemapRead bytes. Entries that cannot be read are 0.
func readEntries(r interface {
	ReadAt([]byte, int64) (int, error)
}, idx []uint64, maxGap uint64) []uint64 {
	out := make([]uint64, len(idx))
	order := make([]int, len(idx))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return idx[order[a]] < idx[order[b]] })
	var buf []byte
	for i := 0; i < len(order); {
		start := idx[order[i]]
		j := i
		// Extend the run while the next entry is within maxGap entries
		// (the kernel computes every entry of a read) and the read stays
		// bounded.
		for j < len(order) && (idx[order[j]]-start+1)*8 <= maxPagemapRead &&
			(j == i || idx[order[j]]-idx[order[j-1]] <= maxGap) {
			j++
		}
		n := int(idx[order[j-1]]-start+1) * 8
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		got, _ := r.ReadAt(buf, int64(start*8))
		for _, k := range order[i:j] {
			off := int(idx[k]-start) * 8
			if off+8 <= got {
				out[k] = binary.LittleEndian.Uint64(buf[off:])
			}
		}
		i = j
	}
	return out
}
