/* Test program for internal/symbolize: prints a capture, waits for a line on
 * stdin, then dlopens argv[1] (built from sym_lib.c), calls sym_lib_entry and
 * prints "ready" again; on a further line it dlcloses the library (unmapped:
 * it is loaded by nothing else) and prints "ready"; then blocks until stdin
 * closes. */
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline, noipa)) void *sym_capture(void) {
	return __builtin_return_address(0);
}

int main(int argc, char **argv) {
	void *ra = sym_capture(); int line = __LINE__;
	printf("direct %p main %d\n", ra, line);
	printf("ready\n");
	fflush(stdout);
	char buf[16];
	if (argc < 2 || read(0, buf, sizeof buf) <= 0)
		return 1;
	void *h = dlopen(argv[1], RTLD_NOW);
	if (!h) {
		fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
		return 1;
	}
	void (*entry)(void) = (void (*)(void))dlsym(h, "sym_lib_entry");
	entry();
	printf("ready\n");
	fflush(stdout);
	if (read(0, buf, sizeof buf) > 0) {
		if (dlclose(h) != 0)
			return 1;
		printf("ready\n");
		fflush(stdout);
	}
	while (read(0, buf, sizeof buf) > 0) {
	}
	return 0;
}
