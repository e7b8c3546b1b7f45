// bench_faults: the page-fault workload of `make bench` (internal/bench).
// It times mmap + touch every page + munmap of 64-page regions in a tight
// single-threaded loop: each touch is one anonymous page fault.
//
// Usage: bench_faults BUDGET_MS ROUNDS
//
// Prints "READY" and waits for a line on stdin (the benchmark loads its
// programs meanwhile), runs a short warm-up, then ROUNDS timed rounds of
// about BUDGET_MS/ROUNDS milliseconds and prints one line:
//   RESULT faults=N median_ns=M min_ns=m
// with nanoseconds per fault (the mmap and munmap included, per page) of
// the thread's CPU time (user + system: the kernel's fault handling and the
// BPF programs it runs count, time spent waiting for a CPU on a busy
// machine does not).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGES 64
#define MAX_ROUNDS 64

static uint64_t clock_ns(clockid_t c)
{
	struct timespec ts;
	clock_gettime(c, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
static uint64_t cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }

static void __attribute__((noinline)) regions(uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		char *volatile p = mmap(NULL, PAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			perror("mmap");
			exit(2);
		}
		for (int j = 0; j < PAGES; j++)
			p[j * 4096] = 1;
		munmap(p, PAGES * 4096);
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 1;
	uint64_t budget = strtoull(argv[1], 0, 10) * 1000000ull;
	int rounds = atoi(argv[2]);
	if (rounds < 1 || rounds > MAX_ROUNDS)
		rounds = 10;
	char line[16];
	printf("READY\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	regions(200);
	double ns[MAX_ROUNDS];
	uint64_t total = 0;
	for (int r = 0; r < rounds; r++) {
		uint64_t t0 = now_ns(), c0 = cpu_ns(), n = 0;
		while (now_ns() - t0 < budget / rounds) {
			regions(16);
			n += 16;
		}
		ns[r] = (double)(cpu_ns() - c0) / (double)(n * PAGES);
		total += n * PAGES;
	}
	qsort(ns, rounds, sizeof ns[0], cmp);
	printf("RESULT faults=%llu median_ns=%.1f min_ns=%.1f\n", (unsigned long long)total, ns[rounds / 2], ns[0]);
	return 0;
}
