/* Test program for internal/symbolize: prints return addresses captured at
 * known source lines, then blocks until stdin closes.
 * Output lines: "<tag> <addr-hex> <function> <line> [<outer-function> <outer-line>]" */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline, noipa)) void *sym_capture(void) {
	return __builtin_return_address(0);
}

__attribute__((noinline)) void sym_direct(void) {
	void *ra = sym_capture(); int line = __LINE__;
	printf("direct %p sym_direct %d\n", ra, line);
}

static int inner_line;
static inline __attribute__((always_inline)) void *sym_inlined(void) {
	void *ra = sym_capture(); inner_line = __LINE__;
	return ra;
}

__attribute__((noinline)) void sym_outer(void) {
	void *ra = sym_inlined(); int line = __LINE__;
	printf("inline %p sym_inlined %d sym_outer %d\n", ra, inner_line, line);
}

int main(void) {
	sym_direct();
	sym_outer();
	printf("func %p sym_direct\n", (void *)sym_direct);
	printf("libc %p malloc\n", (void *)&malloc);
	printf("ready\n");
	fflush(stdout);
	char buf[16];
	while (read(0, buf, sizeof buf) > 0) {
	}
	return 0;
}
