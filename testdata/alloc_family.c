/* alloc_family: the same heap through whichever allocator the program is
 * linked with or preloads, for the tests that check each allocator family is
 * seen (internal/recorder/family_test.go).
 *
 * Truth (bytes requested, by immediate caller; exact at --sample-rate 1):
 *   f_small    1,000,000 live  (100 x 10,000)
 *   f_big     16,777,216 live  (4 x 4 MiB)
 *   f_churn            0 live, 50,000,000 allocated (1000 x 50,000, each freed)
 *   f_calloc   1,000,000 live  (calloc(1000, 1000))
 *   f_realloc  2,000,000 live  (1,000 grown to 2,000,000 through realloc)
 *   f_family     400,000 live, 900,000 allocated: the family's own API
 *                (300,000 + 100,000 kept, 10 x 50,000 freed), built with
 *                -DFAMILY_TC (tc_*), -DFAMILY_MI (mi_*) or -DJE_PREFIX=p
 *                (jemalloc built with --with-jemalloc-prefix=p: p##mallocx,
 *                p##sdallocx; all C calls go through p##malloc etc. too).
 *
 * Usage: alloc_family [seconds]: sleeps that long before exiting; "forks N"
 * as first argument runs the heap in N forked children instead (each child:
 * the truth above; the parent: only f_parent, 3,000,000 live).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#ifdef JE_PREFIX
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define JE(name) CAT(JE_PREFIX, name)
void *JE(malloc)(size_t);
void *JE(calloc)(size_t, size_t);
void *JE(realloc)(void *, size_t);
void JE(free)(void *);
void *JE(mallocx)(size_t, int);
void JE(sdallocx)(void *, size_t, int);
#define malloc(n) JE(malloc)(n)
#define calloc(n, s) JE(calloc)(n, s)
#define realloc(p, n) JE(realloc)(p, n)
#define free(p) JE(free)(p)
#endif
#ifdef FAMILY_TC
void *tc_malloc(size_t);
void *tc_memalign(size_t, size_t);
void tc_free_sized(void *, size_t);
#endif
#ifdef FAMILY_MI
void *mi_malloc_aligned(size_t, size_t);
void *mi_zalloc(size_t);
void mi_free(void *);
#endif

void *volatile keep[512];

__attribute__((noinline)) void f_small(void) {
	for (int i = 0; i < 100; i++) {
		keep[i] = malloc(10000);
		memset(keep[i], 1, 10000);
	}
}
__attribute__((noinline)) void f_big(void) {
	for (int i = 0; i < 4; i++) {
		keep[100 + i] = malloc(4 << 20);
		memset(keep[100 + i], 1, 4 << 20);
	}
}
__attribute__((noinline)) void f_churn(void) {
	for (int i = 0; i < 1000; i++) {
		void *p = malloc(50000);
		keep[200] = p;
		free(p);
	}
	keep[200] = 0;
}
__attribute__((noinline)) void f_calloc(void) { keep[201] = calloc(1000, 1000); }
__attribute__((noinline)) void f_realloc(void) {
	void *p = malloc(1000);
	for (int s = 2000; s <= 2000000; s *= 10)
		p = realloc(p, s);
	keep[202] = p;
}
__attribute__((noinline)) void f_family(void) {
#if defined(FAMILY_TC)
	keep[300] = tc_malloc(300000);
	keep[301] = tc_memalign(64, 100000);
	for (int i = 0; i < 10; i++) {
		void *p = tc_malloc(50000);
		keep[302] = p;
		tc_free_sized(p, 50000);
	}
#elif defined(FAMILY_MI)
	keep[300] = mi_malloc_aligned(300000, 64);
	keep[301] = mi_zalloc(100000);
	for (int i = 0; i < 10; i++) {
		void *p = mi_zalloc(50000);
		keep[302] = p;
		mi_free(p);
	}
#elif defined(JE_PREFIX)
	keep[300] = JE(mallocx)(300000, 0);
	keep[301] = JE(mallocx)(100000, 0);
	for (int i = 0; i < 10; i++) {
		void *p = JE(mallocx)(50000, 0);
		keep[302] = p;
		JE(sdallocx)(p, 50000, 0);
	}
#endif
	keep[302] = 0;
}
__attribute__((noinline)) void f_parent(void) {
	for (int i = 0; i < 3; i++) {
		keep[400 + i] = malloc(1000000);
		memset(keep[400 + i], 3, 1000000);
	}
}

static void heap(void) {
	f_small();
	f_big();
	f_churn();
	f_calloc();
	f_realloc();
	f_family();
}

int main(int argc, char **argv) {
	if (argc > 2 && strcmp(argv[1], "forks") == 0) {
		f_parent();
		int n = atoi(argv[2]);
		for (int c = 0; c < n; c++) {
			pid_t p = fork();
			if (p == 0) {
				/* the child frees its copies of the parent's blocks */
				for (int i = 0; i < 3; i++) {
					free(keep[400 + i]);
					keep[400 + i] = 0;
				}
				heap();
				_exit(0);
			}
		}
		while (wait(NULL) > 0)
			;
		return 0;
	}
	heap();
	if (argc > 1)
		sleep(atoi(argv[1]));
	return 0;
}
