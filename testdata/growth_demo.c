// Memory over time, three shapes (the proof of `memprof report`'s "what
// grew"): leak_grow leaks 64 KiB every 16 ms (4 MiB/s) for the whole run,
// cache_fill fills a 32 MiB cache of 4 KiB entries in the first 2 s and
// keeps it, churn_work allocates and frees 20 x 4 KiB every 16 ms (5 MiB/s,
// nothing kept). Every block is written, so RSS follows.
//
//   growth_demo [SECONDS [noleak]]   (default 8 s; "noleak": no leak_grow)
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TICK_NS (16 * 1000 * 1000L)
#define CACHE_ENTRIES 8192
#define CACHE_FILL_TICKS 125 /* 2 s */

static void *cache[CACHE_ENTRIES];
static int cached;
static void **leaked;
static long nleaked;

__attribute__((noinline)) static void leak_grow(void) {
	void *p = malloc(64 << 10);
	memset(p, 1, 64 << 10);
	leaked[nleaked++] = p;
}

__attribute__((noinline)) static void cache_fill(int n) {
	for (int i = 0; i < n && cached < CACHE_ENTRIES; i++) {
		cache[cached] = malloc(4096);
		memset(cache[cached], 2, 4096);
		cached++;
	}
}

// The compiler may drop a malloc/free pair whose block nobody reads: the
// block goes through a volatile pointer.
static void *volatile sink;

__attribute__((noinline)) static void churn_work(void) {
	for (int i = 0; i < 20; i++) {
		sink = malloc(4096);
		memset(sink, 3, 4096);
		free(sink);
	}
}

int main(int argc, char **argv) {
	double seconds = argc > 1 ? atof(argv[1]) : 8;
	int leak = !(argc > 2 && strcmp(argv[2], "noleak") == 0);
	long ticks = (long)(seconds * 1e9 / TICK_NS);
	leaked = calloc(ticks + 1, sizeof *leaked);
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (long t = 0; t < ticks; t++) {
		if (t < CACHE_FILL_TICKS)
			cache_fill(CACHE_ENTRIES / CACHE_FILL_TICKS + 1);
		if (leak)
			leak_grow();
		churn_work();
		next.tv_nsec += TICK_NS;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
	}
	return 0;
}
