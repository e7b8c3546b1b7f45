package rss

import (
	"testing"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/pprofout"
)

func TestCategorize(t *testing.T) {
	loc := func(fns ...string) []*pprofout.Location {
		var out []*pprofout.Location
		for _, f := range fns {
			out = append(out, &pprofout.Location{Lines: []pprofout.Line{{Function: f}}})
		}
		return out
	}
	p := &pprofout.RSSProfile{SampleRate: 1, Samples: []pprofout.RSSSample{
		{Stack: loc("sysmalloc", "_int_malloc", "__libc_malloc", "main"), Size: 4096, Resident: 10, Labels: map[string]string{"pid": "7"}},
		{Stack: loc("operator new(unsigned long)", "main"), Size: 4096, Resident: 1, Labels: map[string]string{"pid": "7"}},
		{Stack: loc("own_mmap", "main"), Size: 4096, Resident: 3, Labels: map[string]string{"pid": "7"}},
		{Stack: loc("main.leakSlices", "main.main"), Size: 4096, Resident: 2, Labels: map[string]string{"pid": "8"}},
		{Stack: loc(ResidentBefore), Size: 4096, ResidentBytes: 12345, Labels: map[string]string{"pid": "8"}},
	}}
	got := Categorize(p)
	if b := got[7]; b == nil || b.Allocator != 11*4096 || b.Other != 3*4096 || b.Before != 0 {
		t.Errorf("pid 7: %+v, want allocator 11 pages, other 3", got[7])
	}
	if b := got[8]; b == nil || b.Allocator != 0 || b.Other != 2*4096 || b.Before != 12345 {
		t.Errorf("pid 8: %+v, want other 2 pages, before 12345", got[8])
	}
}

func TestAllocatorFrame(t *testing.T) {
	for fn, want := range map[string]bool{
		"malloc": true, "__GI___libc_malloc": true, "_int_malloc": true, "sysmalloc": true, "__libc_calloc": true,
		"operator new(unsigned long)": true, "je_malloc_default": true, "_int_realloc": true, "tcache_init": true,
		"big_mallocs": false, "small_mallocs": false, "my_calloc_wrapper": false, "main": false, "memset": false,
	} {
		if got := allocatorFrame(fn); got != want {
			t.Errorf("allocatorFrame(%q) = %v, want %v", fn, got, want)
		}
	}
}

func TestRegionOf(t *testing.T) {
	maps, err := procmaps.Parse([]byte("55665b980000-55665c9df000 rw-p 00000000 00:00 0                          [heap]\n" +
		"7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n" +
		"7f0000100000-7f0000200000 rw-p 00001000 08:01 1234                       /usr/lib/libc.so.6\n" +
		"7ffd43edd000-7ffd43efe000 rw-p 00000000 00:00 0                          [stack]\n"))
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[uint64]string{
		0x55665b980000: "brk", 0x55665c9de000: "brk", 0x7f0000000000: "anon", 0x7f0000100000: "data",
		0x7ffd43edd000: "stack", 0x1000: "anon", 0x7fff00000000: "anon",
	} {
		if got := regionOf(maps, addr); got != want {
			t.Errorf("regionOf(%#x) = %s, want %s", addr, got, want)
		}
	}
}
