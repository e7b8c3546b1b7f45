// hostile_comm: a target whose names are terminal control sequences and a
// newline starting a forged memprof line. Its file is named so (the comm is
// set from it at exec, then again by prctl), and the test rewrites the
// placeholder XX2JX in the allocating function's name, hostileXX2JXmemprof,
// to ESC [ 2 J newline in the binary's symbol and DWARF strings. The function
// mallocs and touches 8 MiB, then the program exits.
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

__attribute__((noinline)) char *hostileXX2JXmemprof(size_t n) {
	char *p = malloc(n);
	memset(p, 1, n);
	return p;
}

int main(void) {
	prctl(PR_SET_NAME, "\033[2J\nmemprof:F", 0, 0, 0);
	char *volatile p = hostileXX2JXmemprof(8 << 20);
	(void)p;
	return 0;
}
