// bench_pairs: the workload of `make bench` (internal/bench). It times
// malloc(size) + touch + free pairs in a tight single-threaded loop.
//
// Usage: bench_pairs SIZE BUDGET_MS [ROUNDS]
//
// It warms the allocator up, prints "READY" and waits for a line on stdin
// (the benchmark attaches its probes meanwhile), runs a short untimed
// warm-up (first probe hits set up per-thread uprobe state), then runs
// ROUNDS timed rounds of about BUDGET_MS/ROUNDS milliseconds each. The loop
// is adaptive: it reads CLOCK_MONOTONIC every CHUNK pairs, so the same
// budget fits a 10 ns pair and a 10 us one. It prints one line:
//   RESULT size=S pairs=N rounds=R median_ns=M min_ns=m max_ns=x total_pairs=T
// where *_ns are nanoseconds per pair over the rounds, and total_pairs counts
// every pair made after READY (warm-up included), for checking probe counters.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Built as C++ with -DBENCH_NEW (testdata/bench_new.cc), the pairs are
// operator new + operator delete.
#ifdef BENCH_NEW
#include <new>
#define ALLOC(n) ((volatile char *)::operator new(n))
#define FREE(p) ::operator delete((void *)(p))
#else
#define ALLOC(n) ((volatile char *)malloc(n))
#define FREE(p) free((void *)(p))
#endif

#define CHUNK 256
#define MAX_ROUNDS 64

static void *volatile sink; // the block escapes: the compiler keeps the calls

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// pairs makes n malloc+touch+free pairs.
static void __attribute__((noinline)) pairs(size_t size, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		volatile char *p = ALLOC(size);
		if (p == NULL) {
			fprintf(stderr, "malloc(%zu) failed\n", size);
			exit(2);
		}
		p[0] = (char)i;
		p[size - 1] = (char)i;
		sink = (void *)p;
		FREE(p);
	}
}

// run makes pairs in chunks until budget_ns has passed; returns the number
// of pairs and stores the elapsed time.
static uint64_t run(size_t size, uint64_t budget_ns, uint64_t *elapsed)
{
	uint64_t n = 0, start = now_ns(), t;
	do {
		pairs(size, CHUNK);
		n += CHUNK;
		t = now_ns();
	} while (t - start < budget_ns);
	*elapsed = t - start;
	return n;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s SIZE BUDGET_MS [ROUNDS]\n", argv[0]);
		return 2;
	}
	size_t size = strtoull(argv[1], NULL, 10);
	uint64_t budget = strtoull(argv[2], NULL, 10) * 1000000ull;
	int rounds = argc > 3 ? atoi(argv[3]) : 10;
	if (size == 0 || budget == 0 || rounds < 1 || rounds > MAX_ROUNDS) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	uint64_t elapsed, total = 0;
	run(size, 20000000ull, &elapsed); // allocator warm, pages faulted in
	printf("READY\n");
	fflush(stdout);
	char line[64];
	if (fgets(line, sizeof line, stdin) == NULL)
		return 3;
	total += run(size, budget / 10, &elapsed); // warm-up with the probes in place
	double ns[MAX_ROUNDS];
	uint64_t n = 0;
	for (int r = 0; r < rounds; r++) {
		uint64_t k = run(size, budget / rounds, &elapsed);
		ns[r] = (double)elapsed / (double)k;
		n += k;
	}
	total += n;
	qsort(ns, rounds, sizeof ns[0], cmp);
	double median = rounds % 2 ? ns[rounds / 2] : (ns[rounds / 2 - 1] + ns[rounds / 2]) / 2;
	printf("RESULT size=%zu pairs=%llu rounds=%d median_ns=%.2f min_ns=%.2f max_ns=%.2f total_pairs=%llu\n",
	       size, (unsigned long long)n, rounds, median, ns[0], ns[rounds - 1], (unsigned long long)total);
	fflush(stdout);
	return 0;
}
