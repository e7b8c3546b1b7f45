// Package pprofout turns memprof's aggregated heap samples into pprof heap
// profiles written the way Go's runtime writes them, and reads them back for
// summaries.
package pprofout

import "time"

// Mapping is an executable mapping of a profiled process.
type Mapping struct {
	Start, Limit, Offset uint64 // virtual range and file offset of Start
	File                 string // path as the process sees it
	BuildID              string // hex GNU build ID, "" if none
	HasFunctions         bool
	HasFilenames         bool
	HasLineNumbers       bool
	HasInlineFrames      bool // Lines of its Locations include inlined callees
}

// Line is one (possibly inlined) function at a location; Lines of a Location
// are ordered innermost (inlined callee) first, as in pprof.
type Line struct {
	Function   string // demangled name
	SystemName string // raw (mangled) symbol name
	File       string
	Line       int64
}

// Location is one program counter in a stack.
type Location struct {
	Addr    uint64   // absolute address in the process
	Mapping *Mapping // nil if the address is in no known mapping
	Lines   []Line   // empty if unsymbolized
}

// Sample is one (stack, block size) bucket of sampled allocations of one
// process. Counts are as observed by the sampler (not yet unsampled).
type Sample struct {
	Stack      []*Location // leaf first: Stack[0] is the immediate caller of the allocator
	Size       uint64      // block size in bytes
	AllocCount uint64      // sampled allocations during the window
	InuseCount uint64      // sampled allocations still live at the end
	Labels     map[string]string
	NumLabels  map[string]int64
}

// Profile is everything needed to write one pprof heap profile.
type Profile struct {
	Samples    []Sample
	SampleRate uint64 // mean bytes between samples; 1 = every allocation
	Start      time.Time
	Duration   time.Duration
	Comments   []string
	// Mappings optionally lists the process's mappings in the order they
	// are to be written, main executable first (pprof treats the first
	// mapping as the main binary). Mappings referenced by Sample stacks but
	// missing here are appended in order of first use. When Mappings is
	// empty, the first referenced mapping whose file does not look like a
	// shared library is written first.
	Mappings []*Mapping
}
