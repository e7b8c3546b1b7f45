package symbolize

import (
	"strings"
	"testing"
)

// TestDemangleName covers the name forms that reach the symbolizer: Itanium
// C++, legacy Rust (hash suffix dropped), Rust v0 (with an LLVM suffix),
// plain C names, and garbage that looks mangled.
func TestDemangleName(t *testing.T) {
	for _, c := range []struct{ raw, want string }{
		{"_ZN5symns6Widget3runEi", "symns::Widget::run"},
		{"_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE12_M_constructEmc",
			"std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::_M_construct"},
		{"_ZN10rust_alloc5f_vec17h1234567890abcdefE", "rust_alloc::f_vec"},
		{"_ZN5alloc7raw_vec11finish_grow17h0b2c4e5a1f3d7e9cE.llvm.123456", "alloc::raw_vec::finish_grow"},
		{"_RNvCs1234_10rust_alloc5f_vec", "rust_alloc::f_vec"},
		{"_RNvCs1234_10rust_alloc5f_vec.llvm.99", "rust_alloc::f_vec"},
		{"_RNvMNtCs8uzNqyiLKZu_5alloc3vecINtB2_3VecmE4push", "<alloc::vec::Vec<u32>>::push"},
		{"main", "main"},
		{"__libc_start_main", "__libc_start_main"},
		{"_Z", "_Z"},
		{"_RNv", "_RNv"},
		{"_ZN3foo" + strings.Repeat("I", 100), "_ZN3foo" + strings.Repeat("I", 100)},
	} {
		if got := demangleName(c.raw); got != c.want {
			t.Errorf("demangleName(%q) = %q, want %q", c.raw, got, c.want)
		}
	}
	// A name over the bound is returned as is, unparsed.
	long := "_ZN" + strings.Repeat("3abc", maxMangledLen/4) + "E"
	if got := demangleName(long); got != long {
		t.Errorf("a %d-byte name was demangled, want it left as is", len(long))
	}
}

// FuzzDemangleName: no target-controlled name panics the symbolizer.
func FuzzDemangleName(f *testing.F) {
	for _, s := range []string{"_ZN5symns6Widget3runEi", "_RNvCs1234_10rust_alloc5f_vec", "_ZN10rust_alloc5f_vec17h1234567890abcdefE", "_RINvB0_"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { demangleName(s) })
}
