// rec_leaky: allocation sites with known sizes for memprof's record tests.
//
// Every site is its own noinline function so the profile's first frame above
// the allocator must name it. Live bytes at the end (the truth the tests
// assert):
//   early_alloc        12,345      (first allocation of main)
//   leak_small      1,000,000      (1000 x malloc(1000))
//   leak_calloc     1,000,000      (100 x calloc(10, 1000))
//   grow_realloc    2,097,152      (one buffer grown by realloc to 2 MiB)
//   leak_memalign   1,000,000      (10 x posix_memalign(4096, 100000))
//   leak_aligned      640,000      (10 x aligned_alloc(64, 64000))
//   thread_leak     1,000,000      (50 x malloc(20000) in a second thread)
//   churn                   0      (10000 x malloc(4096)+free: 40,960,000 allocated)
//   edge_cases          9,000      (realloc(NULL,5000) + reallocarray(NULL,10,100)
//                                  + malloc(3000) kept after a failed realloc;
//                                  realloc(p,0) frees, failed mallocs count nothing)
//   big_blocks     67,108,864      (32 x malloc(2 MiB), with --big)
//   many_small    134,217,728      (8192 x malloc(16 KiB), with --big)
//
// Usage: rec_leaky [--wait-start] [--wait-end] [--big]
//   --wait-start  print "READY" and wait for a line on stdin before allocating
//   --wait-end    print "DONE" and wait for a line on stdin before exiting
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink[20000];
static volatile size_t huge_size = (size_t)1 << 60; // volatile: keeps the failing calls
static volatile size_t tera = (size_t)1 << 40;
static int nsink;

static void keep(void *p)
{
	if (p == NULL) {
		fprintf(stderr, "allocation failed\n");
		exit(2);
	}
	memset(p, 1, 64 < malloc_usable_size(p) ? 64 : malloc_usable_size(p));
	sink[nsink++] = p;
}

NOINLINE void early_alloc(void) { keep(malloc(12345)); }

NOINLINE void leak_small(void)
{
	for (int i = 0; i < 1000; i++)
		keep(malloc(1000));
}

NOINLINE void leak_calloc(void)
{
	for (int i = 0; i < 100; i++)
		keep(calloc(10, 1000));
}

NOINLINE void grow_realloc(void)
{
	char *buf = NULL;
	for (size_t k = 1; k <= 32; k++) {
		buf = realloc(buf, k * 65536);
		if (!buf)
			exit(2);
		buf[0] = 1;
	}
	sink[nsink++] = buf;
}

NOINLINE void leak_memalign(void)
{
	for (int i = 0; i < 10; i++) {
		void *p = NULL;
		if (posix_memalign(&p, 4096, 100000) != 0)
			exit(2);
		keep(p);
	}
}

NOINLINE void leak_aligned(void)
{
	for (int i = 0; i < 10; i++)
		keep(aligned_alloc(64, 64000));
}

NOINLINE void churn(void)
{
	for (int i = 0; i < 10000; i++) {
		char *volatile p = malloc(4096);
		p[0] = 1;
		free(p);
	}
}

NOINLINE void *thread_leak(void *arg)
{
	(void)arg;
	for (int i = 0; i < 50; i++)
		keep(malloc(20000));
	return NULL;
}

NOINLINE void edge_cases(void)
{
	free(NULL);
	keep(realloc(NULL, 5000)); // realloc(NULL, n) is malloc(n)
	char *q = malloc(7000);
	q[0] = 1;
	q = realloc(q, 0); // frees; glibc returns NULL
	if (q)
		free(q);
	void *volatile huge = malloc(huge_size); // fails: must not count
	if (huge)
		exit(3);
	char *r = malloc(3000);
	r[0] = 1;
	void *volatile r2 = realloc(r, huge_size); // fails: r stays live
	if (r2)
		exit(3);
	keep(r);
	keep(reallocarray(NULL, 10, 100));
	void *volatile ov = reallocarray(NULL, tera, tera); // overflow: fails
	if (ov)
		exit(3);
	void *volatile cv = calloc(tera, tera); // overflow: fails
	if (cv)
		exit(3);
}

NOINLINE void big_blocks(void)
{
	for (int i = 0; i < 32; i++)
		keep(malloc(2 << 20));
}

NOINLINE void many_small(void)
{
	for (int i = 0; i < 8192; i++)
		keep(malloc(16384));
}

static void wait_line(const char *msg)
{
	char line[64];
	printf("%s\n", msg);
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return;
}

int main(int argc, char **argv)
{
	int wait_start = 0, wait_end = 0, big = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--wait-start"))
			wait_start = 1;
		else if (!strcmp(argv[i], "--wait-end"))
			wait_end = 1;
		else if (!strcmp(argv[i], "--big"))
			big = 1;
	}
	early_alloc();
	if (wait_start)
		wait_line("READY");
	leak_small();
	leak_calloc();
	grow_realloc();
	leak_memalign();
	leak_aligned();
	churn();
	pthread_t th;
	pthread_create(&th, NULL, thread_leak, NULL);
	pthread_join(th, NULL);
	edge_cases();
	if (big) {
		big_blocks();
		many_small();
	}
	if (wait_end)
		wait_line("DONE");
	return 0;
}
