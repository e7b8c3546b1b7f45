/* Test program for internal/symbolize: prints return addresses captured at
 * known source lines, then blocks until stdin closes.
 * Output lines: "<tag> <addr-hex> <function> <line> [<outer-function> <outer-line>]"
 * Each argument is a file mapped executable (at most its first 1 MiB), as a
 * hostile object next to the program's own code: "mapped<i> <addr-hex>". */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

int main(int argc, char **argv) {
	for (int i = 1; i < argc; i++) {
		int fd = open(argv[i], O_RDONLY);
		struct stat st;
		if (fd < 0 || fstat(fd, &st) < 0) {
			perror(argv[i]);
			return 1;
		}
		size_t len = st.st_size < (1 << 20) ? (size_t)st.st_size : (1 << 20);
		void *m = mmap(NULL, len ? len : 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
		if (m == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		close(fd);
		printf("mapped%d %p\n", i, m);
	}
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
