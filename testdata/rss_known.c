/* rss_known: makes known amounts of anonymous memory resident, each from
 * its own function, for the RSS tier's tests.
 *
 *   rss_known   wait for a line on stdin, then fault in:
 *     big_mallocs    4 x 8 MiB malloc (glibc mmaps them)      32 MiB
 *     small_mallocs  16384 x 1 KiB malloc (brk heap)          16 MiB + headers
 *     own_mmap       24 MiB mmap                              24 MiB
 *     thp_region     8 MiB mmap, MADV_HUGEPAGE, 2 MiB aligned  8 MiB
 *     unmapped       8 MiB mmap, touched, munmap                0
 *     dontneed       8 MiB mmap, touched, MADV_DONTNEED         0
 *   print "ready" and wait for another line (or EOF), then exit.
 * Every page is touched by a loop in the function itself (small_mallocs
 * pauses now and then, as a program doing other work would).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <stdint.h>
#include <unistd.h>

#define MiB (1024 * 1024)

static void *volatile keep[1 << 15];
static int nkeep;


__attribute__((noinline)) void big_mallocs(void)
{
	for (int i = 0; i < 4; i++) {
		char *volatile p = malloc(8 * MiB);
		for (size_t o = 0; o < 8 * MiB; o += 4096)
			p[o] = 1;
		keep[nkeep++] = p;
	}
}

__attribute__((noinline)) void small_mallocs(void)
{
	for (int i = 0; i < 16384; i++) {
		if (i % 1024 == 0)
			usleep(20000);
		char *volatile p = malloc(1024);
		for (size_t o = 0; o < 1024; o += 256)
			p[o] = 1;
		keep[nkeep++] = p;
	}
}

__attribute__((noinline)) void own_mmap(void)
{
	char *volatile p = mmap(NULL, 24 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t o = 0; o < 24 * MiB; o += 4096)
		p[o] = 1;
	keep[nkeep++] = p;
}

__attribute__((noinline)) void thp_region(void)
{
	char *m = mmap(NULL, 10 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *volatile p = (char *)(((uintptr_t)m + 2 * MiB - 1) & ~(uintptr_t)(2 * MiB - 1));
	madvise(p, 8 * MiB, MADV_HUGEPAGE);
	for (size_t o = 0; o < 8 * MiB; o += 4096)
		p[o] = 1;
	keep[nkeep++] = p;
}

__attribute__((noinline)) void unmapped(void)
{
	char *volatile p = mmap(NULL, 8 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t o = 0; o < 8 * MiB; o += 4096)
		p[o] = 1;
	munmap(p, 8 * MiB);
}

__attribute__((noinline)) void dontneed(void)
{
	char *volatile p = mmap(NULL, 8 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t o = 0; o < 8 * MiB; o += 4096)
		p[o] = 1;
	madvise(p, 8 * MiB, MADV_DONTNEED);
	keep[nkeep++] = p;
}

int main(void)
{
	char line[64];
	setvbuf(stdout, NULL, _IONBF, 0);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	big_mallocs();
	usleep(100000);
	small_mallocs();
	usleep(100000);
	own_mmap();
	usleep(100000);
	thp_region();
	unmapped();
	usleep(100000);
	dontneed();
	usleep(100000);
	printf("ready\n");
	fgets(line, sizeof line, stdin);
	return 0;
}
