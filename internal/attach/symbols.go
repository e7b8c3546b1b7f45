// Package attach finds the allocator entry points in a target's mapped
// objects, chooses where on each function to place the uprobe, and attaches
// memprof's BPF programs to them for one process at a time, so only the
// targets trap.
package attach

import (
	"sort"
	"strings"

	mbpf "github.com/memprof/memprof/bpf"
)

// Kind says which BPF entry program serves an allocator function and how its
// arguments are read. The values are enum probe_kind of bpf/memprof.h (the low byte of a
// probe's cookie).
type Kind int

// The kinds of allocator function, by the registers their arguments are in.
const (
	Malloc        = Kind(mbpf.MemprofProbeKindP_MALLOC)         // size in rdi: malloc, valloc, pvalloc, mallocx, operator new
	Calloc        = Kind(mbpf.MemprofProbeKindP_CALLOC)         // n in rdi, size in rsi
	Memalign      = Kind(mbpf.MemprofProbeKindP_MEMALIGN)       // alignment in rdi, size in rsi: memalign, aligned_alloc
	PosixMemalign = Kind(mbpf.MemprofProbeKindP_POSIX_MEMALIGN) // memptr in rdi, size in rdx; returns 0 on success
	Realloc       = Kind(mbpf.MemprofProbeKindP_REALLOC)        // old block in rdi, size in rsi: realloc, rallocx
	Reallocarray  = Kind(mbpf.MemprofProbeKindP_REALLOCARRAY)   // old block in rdi, n in rsi, size in rdx
	Xallocx       = Kind(mbpf.MemprofProbeKindP_XALLOCX)        // block in rdi, resized in place; returns the new size
	Free          = Kind(mbpf.MemprofProbeKindP_FREE)           // block in rdi: free, dallocx, sdallocx, operator delete
)

// argRegs lists the argument registers each kind reads at its entry probe;
// the probe may move forward only over instructions that leave them intact.
func (k Kind) argRegs() []string {
	switch k {
	case Malloc, Free, Xallocx:
		return []string{"RDI"}
	case Calloc, Memalign, Realloc:
		return []string{"RDI", "RSI"}
	case PosixMemalign, Reallocarray:
		return []string{"RDI", "RSI", "RDX"}
	}
	return []string{"RDI", "RSI", "RDX"}
}

// Returns reports whether the kind needs a return probe.
func (k Kind) Returns() bool { return k != Free }

func (k Kind) String() string {
	return [...]string{"malloc", "calloc", "memalign", "posix_memalign", "realloc", "reallocarray", "xallocx", "free"}[k]
}

// cSymbols are the C allocator entry points of glibc and jemalloc (jemalloc
// exports the C11/POSIX set too) plus jemalloc's non-standard API.
var cSymbols = map[string]Kind{
	"malloc":         Malloc,
	"calloc":         Calloc,
	"realloc":        Realloc,
	"reallocarray":   Reallocarray,
	"free":           Free,
	"cfree":          Free,
	"posix_memalign": PosixMemalign,
	"aligned_alloc":  Memalign,
	"memalign":       Memalign,
	"valloc":         Malloc,
	"pvalloc":        Malloc,
	"mallocx":        Malloc,
	"rallocx":        Realloc,
	"xallocx":        Xallocx,
	"sdallocx":       Free,
	"dallocx":        Free,
}

// cxxSymbols are the C++ operator new/delete variants (Itanium ABI mangled
// names, 64-bit size_t) that jemalloc and libstdc++ export. jemalloc's
// operator new inlines its malloc fast path, so it must be probed itself.
var cxxSymbols = map[string]Kind{
	"_Znwm":                               Malloc,
	"_Znam":                               Malloc,
	"_ZnwmRKSt9nothrow_t":                 Malloc,
	"_ZnamRKSt9nothrow_t":                 Malloc,
	"_ZnwmSt11align_val_t":                Malloc,
	"_ZnamSt11align_val_t":                Malloc,
	"_ZnwmSt11align_val_tRKSt9nothrow_t":  Malloc,
	"_ZnamSt11align_val_tRKSt9nothrow_t":  Malloc,
	"_ZdlPv":                              Free,
	"_ZdaPv":                              Free,
	"_ZdlPvm":                             Free,
	"_ZdaPvm":                             Free,
	"_ZdlPvRKSt9nothrow_t":                Free,
	"_ZdaPvRKSt9nothrow_t":                Free,
	"_ZdlPvSt11align_val_t":               Free,
	"_ZdaPvSt11align_val_t":               Free,
	"_ZdlPvmSt11align_val_t":              Free,
	"_ZdaPvmSt11align_val_t":              Free,
	"_ZdlPvSt11align_val_tRKSt9nothrow_t": Free,
	"_ZdaPvSt11align_val_tRKSt9nothrow_t": Free,
}

// MayThrow reports whether an allocator function can throw (C++ operator
// new and its array, nothrow and aligned variants: the nothrow ones catch
// the exception of the throwing one they call). Their results are taken at
// their ret instructions: a return probe would replace the return address
// the C++ unwinder reads, and the exception would end in std::terminate.
func MayThrow(name string) bool {
	k, ok := cxxSymbols[name]
	return ok && k != Free || throwingAliases[name]
}

// throwingAliases are C-named entry points of allocators that implement
// operator new (and may throw std::bad_alloc) under their own names, for
// when they are probed: tcmalloc's tc_new family and mimalloc's mi_new
// family. A new allocator's operator new aliases go here.
var throwingAliases = map[string]bool{
	"tc_new": true, "tc_newarray": true, "tc_new_nothrow": true, "tc_newarray_nothrow": true,
	"tc_new_aligned": true, "tc_newarray_aligned": true,
	"tc_new_aligned_nothrow": true, "tc_newarray_aligned_nothrow": true,
	"mi_new": true, "mi_new_aligned": true, "mi_new_nothrow": true, "mi_new_aligned_nothrow": true,
	"mi_new_n": true, "mi_new_realloc": true, "mi_new_reallocn": true,
}

// KindOf returns the kind of an allocator symbol.
func KindOf(name string) (Kind, bool) {
	if k, ok := cSymbols[name]; ok {
		return k, true
	}
	k, ok := cxxSymbols[name]
	return k, ok
}

// Allocator families that export their API under their own names besides
// (or instead of) the C ones. Where a library exports both, the aliases share
// one address and one probe; where the family names are separate functions
// (mimalloc's mi_* variants) each is probed, a call nested in another being
// left to the outer one by the BPF side.

// tcSymbols are gperftools tcmalloc's tc_* entry points (libtcmalloc and
// libtcmalloc_minimal, gperftools/tcmalloc.h).
var tcSymbols = map[string]Kind{
	"tc_malloc": Malloc, "tc_malloc_skip_new_handler": Malloc, "tc_valloc": Malloc, "tc_pvalloc": Malloc,
	"tc_calloc": Calloc, "tc_realloc": Realloc, "tc_memalign": Memalign, "tc_posix_memalign": PosixMemalign,
	"tc_free": Free, "tc_cfree": Free, "tc_free_sized": Free,
	"tc_new": Malloc, "tc_newarray": Malloc, "tc_new_nothrow": Malloc, "tc_newarray_nothrow": Malloc,
	"tc_new_aligned": Malloc, "tc_newarray_aligned": Malloc, "tc_new_aligned_nothrow": Malloc, "tc_newarray_aligned_nothrow": Malloc,
	"tc_delete": Free, "tc_deletearray": Free, "tc_delete_sized": Free, "tc_deletearray_sized": Free,
	"tc_delete_nothrow": Free, "tc_deletearray_nothrow": Free, "tc_delete_aligned": Free, "tc_deletearray_aligned": Free,
	"tc_delete_sized_aligned": Free, "tc_deletearray_sized_aligned": Free, "tc_delete_aligned_nothrow": Free, "tc_deletearray_aligned_nothrow": Free,
}

// miSymbols are mimalloc's mi_* entry points whose arguments match a Kind
// (mimalloc.h): size first (malloc-like), count and size (calloc-like), old
// block then size or count and size (realloc-like); extra alignment or
// offset arguments come after the ones read. Not probed: the mi_heap_*
// functions (a heap comes first), mi_strdup/mi_strndup/mi_realpath (the size
// is not an argument), mi_expand and mi_reallocarr (other result contracts).
var miSymbols = map[string]Kind{
	"mi_malloc": Malloc, "mi_zalloc": Malloc, "mi_malloc_small": Malloc, "mi_zalloc_small": Malloc,
	"mi_malloc_aligned": Malloc, "mi_malloc_aligned_at": Malloc, "mi_zalloc_aligned": Malloc, "mi_zalloc_aligned_at": Malloc,
	"mi_valloc": Malloc, "mi_pvalloc": Malloc,
	"mi_new": Malloc, "mi_new_nothrow": Malloc, "mi_new_aligned": Malloc, "mi_new_aligned_nothrow": Malloc,
	"mi_calloc": Calloc, "mi_mallocn": Calloc, "mi_calloc_aligned": Calloc, "mi_calloc_aligned_at": Calloc, "mi_new_n": Calloc,
	"mi_realloc": Realloc, "mi_rezalloc": Realloc, "mi_reallocf": Realloc, "mi_new_realloc": Realloc,
	"mi_realloc_aligned": Realloc, "mi_realloc_aligned_at": Realloc, "mi_rezalloc_aligned": Realloc, "mi_rezalloc_aligned_at": Realloc,
	"mi_reallocn": Reallocarray, "mi_recalloc": Reallocarray, "mi_reallocarray": Reallocarray, "mi_new_reallocn": Reallocarray,
	"mi_recalloc_aligned": Reallocarray, "mi_recalloc_aligned_at": Reallocarray,
	"mi_memalign": Memalign, "mi_aligned_alloc": Memalign, "mi_posix_memalign": PosixMemalign,
	"mi_free": Free, "mi_cfree": Free, "mi_free_size": Free, "mi_free_aligned": Free, "mi_free_size_aligned": Free,
}

// family is an allocator API recognised by its own exported names.
type family struct {
	name    string          // allocator name reported ("tcmalloc", "mimalloc")
	symbols map[string]Kind // its entry points
	anchors []string        // names that must all be defined for the family to count
}

var families = []family{
	{"tcmalloc", tcSymbols, []string{"tc_malloc", "tc_free", "tc_version"}},
	{"mimalloc", miSymbols, []string{"mi_malloc", "mi_free", "mi_version"}},
}

// jemallocOnly are names only jemalloc's API has: a prefix P under which at
// least two of them are defined (P+"mallctl", P+"mallocx", ...) is a jemalloc
// built with --with-jemalloc-prefix=P (upstream Redis: je_; Rust's
// tikv-jemallocator: _rjem_). Two, because a Rust binary linked with
// --gc-sections keeps only the functions it calls (mallocx, sdallocx, ...).
var jemallocOnly = []string{"mallctl", "mallctlnametomib", "mallctlbymib", "mallocx", "rallocx", "xallocx", "sallocx", "dallocx", "sdallocx", "nallocx", "malloc_stats_print"}

// jemallocPrefixes returns the prefixes under which defined lists a
// prefixed jemalloc API (never the empty prefix: the plain names are in
// cSymbols already).
func jemallocPrefixes(defined map[string]bool) []string {
	count := map[string]int{}
	for name := range defined {
		for _, s := range jemallocOnly {
			if p, ok := strings.CutSuffix(name, s); ok && p != "" {
				count[p]++
			}
		}
	}
	var out []string
	for p, n := range count {
		if n >= 2 && (defined[p+"malloc"] || defined[p+"mallocx"]) {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// namer resolves allocator symbol names for one object: the C and C++ names,
// plus the names of the families the object defines.
type namer struct {
	fam      map[string]string // family symbol -> family name
	kinds    map[string]Kind
	prefixes []string // jemalloc prefixes
}

func newNamer(defined map[string]bool) *namer {
	n := &namer{fam: map[string]string{}, kinds: map[string]Kind{}}
	for _, f := range families {
		ok := true
		for _, a := range f.anchors {
			ok = ok && defined[a]
		}
		if !ok {
			continue
		}
		for s, k := range f.symbols {
			n.fam[s] = f.name
			n.kinds[s] = k
		}
	}
	n.prefixes = jemallocPrefixes(defined)
	for _, p := range n.prefixes {
		for s, k := range cSymbols {
			if s == "cfree" {
				continue
			}
			n.fam[p+s] = "jemalloc"
			n.kinds[p+s] = k
		}
	}
	return n
}

// kind returns the kind of name in this object, and the family it belongs
// to ("" for the plain C and C++ names).
func (n *namer) kind(name string) (Kind, string, bool) {
	if k, ok := KindOf(name); ok {
		return k, "", true
	}
	if k, ok := n.kinds[name]; ok {
		return k, n.fam[name], true
	}
	return 0, "", false
}

// nameRank orders aliases of one function: the C names first (free before
// cfree), then family names, then C++ operators, so the site is reported and
// classified by its most common name.
func nameRank(name string) int {
	if name == "cfree" {
		return 1
	}
	if _, ok := cSymbols[name]; ok {
		return 0
	}
	if _, ok := cxxSymbols[name]; ok {
		return 3
	}
	return 2
}
