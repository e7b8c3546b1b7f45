/* frag_glibc: a heap with known fragmentation, reporting the allocator's own
 * truth so tests can check memprof's fragmentation verdict.
 *
 *   frag_glibc frag N SIZE KEEP   malloc N blocks of SIZE bytes, free all but
 *                                 every KEEP-th: the survivors pin the pages
 *   frag_glibc keep N SIZE        malloc N blocks of SIZE bytes, keep all
 *   frag_glibc threads T SIZE     T threads each malloc and keep 64 blocks of
 *                                 SIZE bytes at the same time (glibc arenas)
 *
 * Then it prints key=value lines:
 *   glibc_uordblks glibc_arena glibc_hblkhd   from mallinfo2()
 *   je_allocated je_resident                  from jemalloc's mallctl, when
 *                                             jemalloc is LD_PRELOADed
 *   live_requested                            bytes the program holds
 * With FRAG_WAIT set in the environment it first prints "waiting" and waits
 * for a line, so a profiler can attach before the first allocation.
 * then "ready", and blocks until stdin is closed or a line arrives.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*mallctl_fn)(const char *, void *, size_t *, void *, size_t);

static size_t g_size;
static pthread_barrier_t g_bar;

__attribute__((noinline)) static void *frag_alloc(size_t size)
{
	char *p = malloc(size);
	if (!p) {
		perror("malloc");
		exit(1);
	}
	memset(p, 0x5a, size);
	return p;
}

static void *thread_main(void *arg)
{
	void **blocks = arg;
	pthread_barrier_wait(&g_bar); /* all threads allocate concurrently */
	for (int i = 0; i < 64; i++)
		blocks[i] = frag_alloc(g_size);
	pthread_barrier_wait(&g_bar);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s frag N SIZE KEEP | keep N SIZE | threads T SIZE\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	size_t n = strtoull(argv[2], NULL, 0);
	g_size = strtoull(argv[3], NULL, 0);
	size_t live = 0;
	if (getenv("FRAG_WAIT")) {
		/* let a profiler attach before the first allocation */
		char go[16];
		printf("waiting\n");
		fflush(stdout);
		if (!fgets(go, sizeof go, stdin))
			return 3;
	}

	if (strcmp(mode, "threads") == 0) {
		pthread_t *th = calloc(n, sizeof *th);
		void ***blocks = calloc(n, sizeof *blocks);
		pthread_barrier_init(&g_bar, NULL, (unsigned)n);
		for (size_t t = 0; t < n; t++) {
			blocks[t] = calloc(64, sizeof(void *));
			pthread_create(&th[t], NULL, thread_main, blocks[t]);
		}
		for (size_t t = 0; t < n; t++)
			pthread_join(th[t], NULL);
		live = n * 64 * g_size;
	} else {
		size_t keep = 1;
		if (strcmp(mode, "frag") == 0) {
			if (argc < 5) {
				fprintf(stderr, "frag needs KEEP\n");
				return 2;
			}
			keep = strtoull(argv[4], NULL, 0);
		} else if (strcmp(mode, "keep") != 0) {
			fprintf(stderr, "unknown mode %s\n", mode);
			return 2;
		}
		void **v = malloc(n * sizeof *v);
		for (size_t i = 0; i < n; i++)
			v[i] = frag_alloc(g_size);
		for (size_t i = 0; i < n; i++) {
			if (i % keep == 0)
				live += g_size;
			else
				free(v[i]);
		}
		/* v stays allocated: the pointer array is part of the live heap. */
		live += n * sizeof *v;
	}

	struct mallinfo2 mi = mallinfo2();
	printf("glibc_uordblks=%zu\nglibc_arena=%zu\nglibc_hblkhd=%zu\n", mi.uordblks, mi.arena, mi.hblkhd);
	mallctl_fn mallctl = (mallctl_fn)dlsym(RTLD_DEFAULT, "mallctl");
	if (mallctl) {
		uint64_t epoch = 1;
		size_t sz = sizeof epoch;
		mallctl("epoch", &epoch, &sz, &epoch, sz); /* refresh cached stats */
		size_t allocated = 0, resident = 0;
		sz = sizeof allocated;
		mallctl("stats.allocated", &allocated, &sz, NULL, 0);
		sz = sizeof resident;
		mallctl("stats.resident", &resident, &sz, NULL, 0);
		printf("je_allocated=%zu\nje_resident=%zu\n", allocated, resident);
	}
	printf("live_requested=%zu\nready\n", live);
	fflush(stdout);
	char line[16];
	(void)fgets(line, sizeof line, stdin);
	return 0;
}
