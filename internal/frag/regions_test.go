package frag

import (
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/procmaps"
)

const mb = 1 << 20

func entry(start, end uint64, perms, path string, rss uint64) procmaps.SmapsEntry {
	return procmaps.SmapsEntry{Mapping: procmaps.Mapping{Start: start, End: end, Perms: perms, Path: path}, Rss: rss}
}

// TestClassifyRegions splits a made-up process: brk heap, a glibc arena
// (64 MiB-aligned reservation), a thread stack under its guard page, one
// found by its stack pointer, the program's own mapping, and a mapping
// where a large block and the program's own memory were merged.
func TestClassifyRegions(t *testing.T) {
	const arena = 0x7f0000000000 // 64 MiB aligned
	entries := []procmaps.SmapsEntry{
		entry(0x1000000, 0x1000000+30*mb, "rw-p", "[heap]", 20*mb),
		entry(arena, arena+8*mb, "rw-p", "", 6*mb),
		entry(arena+8*mb, arena+64*mb, "---p", "", 0),
		entry(0x7f1000000000, 0x7f1000001000, "---p", "", 0), // guard
		entry(0x7f1000001000, 0x7f1000801000, "rw-p", "", 256<<10),
		entry(0x7f2000000000, 0x7f2000800000, "rw-p", "", 512<<10), // stack found by sp
		entry(0x7f3000000000, 0x7f3000000000+200*mb, "rw-p", "", 200*mb),
		entry(0x7f4000000000, 0x7f4000000000+205*mb, "rw-p", "", 205*mb), // 5 MiB of blocks merged with 200 MiB of the program's
		entry(0x7ffd00000000, 0x7ffd00021000, "rw-p", "[stack]", 16<<10),
		entry(0x400000, 0x401000, "r-xp", "/bin/prog", 4096),
	}
	entries[9].Inode = 7
	blocks := []Block{{0x7f4000000000 + 16, mb}, {0x7f4000000000 + 2*mb, 4 * mb}, {0x1000010, 100}}
	sps := []uint64{0x7f2000700000}

	g := ClassifyRegions(entries, sps, Glibc, blocks)
	if g.BrkHeap != 20*mb || g.GlibcArenas != 6*mb || g.BlockRegions != 5*mb || g.Stacks != 256<<10+512<<10+16<<10 || g.Other != 400*mb {
		t.Errorf("glibc split %+v", g)
	}
	if g.Total != g.AllocatorRSS()+g.Stacks+g.Other {
		t.Errorf("total %d != allocator %d + stacks %d + other %d", g.Total, g.AllocatorRSS(), g.Stacks, g.Other)
	}
	// Other allocators: a mapping holding a block is theirs, wholly.
	j := ClassifyRegions(entries, sps, Jemalloc, blocks)
	if j.BlockRegions != 205*mb || j.Other != 200*mb {
		t.Errorf("jemalloc split %+v", j)
	}
	if s := g.String(); !strings.Contains(s, "allocator's anonymous RSS 31.0 MiB") {
		t.Errorf("String() = %q", s)
	}
}

// TestBounded: with blocks that may predate the attach, an alarm is given
// only when it holds whatever those blocks were.
func TestBounded(t *testing.T) {
	// 200 MiB heap, 14 MiB seen live, up to 200 MiB mapped before: no verdict.
	v := Bounded(Glibc, 200*mb, 14*mb, 200*mb, nil, "attached while running")
	if v.Alarm || v.Advice != nil || v.Withheld == "" || !strings.HasPrefix(v.Summary, "no verdict") {
		t.Errorf("large pre-attach heap: %+v", v)
	}
	// 200 KiB mapped before the attach cannot explain 150 MiB of excess.
	v = Bounded(Glibc, 200*mb, 14*mb, 200<<10, nil, "attached while running")
	if !v.Alarm || v.Withheld != "" || len(v.Advice) == 0 || !strings.Contains(v.Summary, "holds even if") {
		t.Errorf("small pre-attach heap: %+v", v)
	}
	// Healthy stays healthy: unseen blocks can only lower the ratio.
	v = Bounded(Glibc, 20*mb, 19*mb, 64*mb, nil, "attached while running")
	if v.Alarm || v.Withheld != "" || !strings.HasPrefix(v.Summary, "healthy") {
		t.Errorf("healthy: %+v", v)
	}
}

// TestWritableAnon sums writable anonymous mappings and the brk heap.
func TestWritableAnon(t *testing.T) {
	maps := []procmaps.Mapping{
		{Start: 0, End: 4 * mb, Perms: "rw-p", Path: "[heap]"},
		{Start: 8 * mb, End: 9 * mb, Perms: "rw-p"},
		{Start: 9 * mb, End: 72 * mb, Perms: "---p"},
		{Start: 100 * mb, End: 101 * mb, Perms: "rw-p", Path: "/lib/x.so", Inode: 3},
		{Start: 200 * mb, End: 208 * mb, Perms: "rw-p", Path: "[stack]"},
	}
	if n := WritableAnon(maps); n != 5*mb {
		t.Errorf("WritableAnon = %d, want %d", n, 5*mb)
	}
}
