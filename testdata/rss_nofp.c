/* rss_nofp: faults in memory in a leaf function called through two
 * functions, all built without frame pointers (the test builds it with
 * -O2 -fomit-frame-pointer), for the RSS tier's CFI stack walk.
 *
 *   rss_nofp [MiB]   wait for a line on stdin, then fault in MiB (default
 *   32) of a fresh anonymous mapping in leaf() <- mid() <- main(), one
 *   store per page; print "ready" and wait for another line (or EOF).
 *
 * Truth: every byte of the mapping (MiB x 2^20) resident, each page first
 * touched by leaf with mid and main above it. leaf and mid keep locals on
 * the stack, and leaf zeroes rbp (a general register without frame
 * pointers), so a frame-pointer walk cannot find their callers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

__attribute__((noinline)) long leaf(char *p, size_t n, long seed)
{
	volatile long scratch[16];
	long acc = seed;
	__asm__ volatile("xor %%ebp, %%ebp" ::: "rbp");
	for (size_t o = 0; o < n; o += 4096) {
		scratch[o / 4096 % 16] = acc;
		acc = acc * 6364136223846793005L + 1442695040888963407L;
		((volatile char *)p)[o] = (char)(acc >> 56) | 1;
	}
	return acc + scratch[3];
}

__attribute__((noinline)) long mid(char *p, size_t n)
{
	volatile char pad[256];
	memset((char *)pad, 1, sizeof pad);
	long r = leaf(p, n, pad[7]);
	return r ^ pad[100];
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
	char line[64];
	setvbuf(stdout, NULL, _IONBF, 0);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	size_t n = mib << 20;
	char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	madvise(p, n, MADV_NOHUGEPAGE);
	long r = mid(p, n);
	printf("ready\n");
	if (r == 42)
		puts("");
	fgets(line, sizeof line, stdin);
	return 0;
}
