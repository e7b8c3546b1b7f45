// Package attach finds the allocator entry points in a target's mapped
// objects, chooses where on each function to place the uprobe, and attaches
// memprof's BPF programs to them for one process at a time, so only the
// targets trap.
package attach

import mbpf "github.com/memprof/memprof/bpf"

// Kind says which BPF entry program serves an allocator function and how its
// arguments are read. The values are enum probe_kind of bpf/memprof.h (the low byte of a
// probe's cookie).
type Kind int

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
