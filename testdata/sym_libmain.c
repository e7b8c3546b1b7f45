/* Test program for internal/symbolize: calls into libsym_lib.so (a library
 * the test builds from sym_lib.c), then blocks until stdin closes. */
#include <stdio.h>
#include <unistd.h>

void sym_lib_entry(void);

int main(void) {
	sym_lib_entry();
	printf("ready\n");
	fflush(stdout);
	char buf[16];
	while (read(0, buf, sizeof buf) > 0) {
	}
	return 0;
}
