/* Shared library for internal/symbolize tests. Built twice by the tests:
 * with -DSYM_VARIANT=1 the exported function calls sym_lib_variant_b instead
 * of sym_lib_variant_a, so a test can tell which file a process mapped. */
#include <stdio.h>

__attribute__((noinline, noipa)) void *sym_lib_capture(void) {
	return __builtin_return_address(0);
}

#ifndef SYM_VARIANT
__attribute__((noinline)) void sym_lib_variant_a(void) {
	void *ra = sym_lib_capture(); int line = __LINE__;
	printf("lib %p sym_lib_variant_a %d\n", ra, line);
}
#else
__attribute__((noinline)) void sym_lib_variant_b(void) {
	int pad = 0; asm volatile("" : "+r"(pad)); void *ra = sym_lib_capture(); int line = __LINE__;
	printf("lib %p sym_lib_variant_b %d\n", ra, line);
}
#endif

void sym_lib_entry(void) {
#ifndef SYM_VARIANT
	sym_lib_variant_a();
#else
	sym_lib_variant_b();
#endif
}
