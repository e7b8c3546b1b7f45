/* oom_leak: memory-leak victim for the OOM flight recorder tests.
 *
 *   oom_leak leak BLOCK   wait for a line on stdin, then leak BLOCK-byte
 *                         blocks from leak_block(), touching every page,
 *                         until the kernel kills the process
 *   oom_leak idle BYTES   wait for a line on stdin, allocate and touch BYTES
 *                         once, print "ready", then sleep until killed (the
 *                         bystander)
 *
 * Each leaked block is reported as "leaked N" on stdout every 8 MiB so the
 * test can see how far it got.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void **keep; /* keeps the blocks reachable: a leak by growth */
static size_t nkeep, capkeep;
static char *volatile hold; /* the bystander's block, kept visibly alive */

__attribute__((noinline)) void *leak_block(size_t size)
{
	void *p = malloc(size);
	if (!p)
		return NULL;
	memset(p, 0xa5, size); /* make every page resident */
	if (nkeep == capkeep) {
		capkeep = capkeep ? capkeep * 2 : 1024;
		keep = realloc(keep, capkeep * sizeof *keep);
	}
	keep[nkeep++] = p;
	return p;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s leak BLOCK | idle BYTES\n", argv[0]);
		return 2;
	}
	size_t n = strtoull(argv[2], NULL, 0);
	char line[64];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("waiting\n");
	if (!fgets(line, sizeof line, stdin))
		return 3;
	if (strcmp(argv[1], "idle") == 0) {
		char *p = malloc(n);
		memset(p, 1, n);
		hold = p;
		printf("ready\n");
		for (;;)
			pause();
	}
	size_t total = 0, reported = 0;
	for (;;) {
		if (!leak_block(n)) {
			printf("malloc failed after %zu bytes\n", total);
			return 4;
		}
		total += n;
		if (total - reported >= (8u << 20)) {
			printf("leaked %zu\n", total);
			reported = total;
		}
	}
}
