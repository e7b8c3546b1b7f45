/* Test program for internal/unwind. Built by the tests with and without
 * frame pointers and linked against unw_lib.c (also built both ways).
 *
 *   unw_chain chain   main -> level1 .. level8 -> recurse x5 -> unw_lib_entry
 *                     -> unw_lib_mid -> leaf (callback in the executable)
 *   unw_chain thread  thread_fn -> tlevel1 -> tlevel2 -> unw_lib_entry
 *                     -> unw_lib_mid -> leaf, in a second thread
 *   unw_chain qsort   main -> sort_level1 -> qsort (libc) -> cmp_block -> leaf
 *   unw_chain signal  main -> sig_level1 -> sig_level2 -> raise(SIGUSR1)
 *                     -> [signal frame] -> on_signal -> leaf
 *
 * leaf prints "ready <tid>" and blocks in read(0): the test then stops the
 * thread with ptrace, copies its stack and unwinds it. Every function keeps
 * several values live across its call so that, without frame pointers, rbp
 * is used as an ordinary callee-saved register. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int unw_lib_entry(int x, int (*cb)(int));

volatile int sink;

__attribute__((noipa)) int leaf(int x)
{
	char line[64], c;
	int n = snprintf(line, sizeof line, "ready %d\n", (int)gettid());
	if (write(1, line, n) != n)
		abort();
	if (read(0, &c, 1) < 0)
		abort();
	sink += x;
	return x + 1;
}

__attribute__((noipa)) int recurse(int n, int x)
{
	volatile char pad[24];
	pad[0] = (char)n;
	int r;
	if (n <= 1)
		r = unw_lib_entry(x, leaf);
	else
		r = recurse(n - 1, x + n);
	sink += pad[0];
	return r + n;
}

#define LEVEL(n, call)                                                      \
	__attribute__((noipa)) int level##n(int a)                          \
	{                                                                   \
		volatile char pad[16 * n];                                  \
		int b = a * 3, c = a ^ 5, d = a + 7, e = a - 1, f = a * a; \
		pad[0] = (char)a;                                           \
		int r = call;                                               \
		sink += pad[0];                                             \
		return r + b + c + d + e + f;                               \
	}

LEVEL(8, recurse(5, a))
LEVEL(7, level8(a + 1))
LEVEL(6, level7(a + 1))
LEVEL(5, level6(a + 1))
LEVEL(4, level5(a + 1))
LEVEL(3, level4(a + 1))
LEVEL(2, level3(a + 1))
LEVEL(1, level2(a + 1))

__attribute__((noipa)) int tlevel2(int a)
{
	int b = a * 3, c = a ^ 5, d = a + 7;
	int r = unw_lib_entry(a, leaf);
	return r + b + c + d;
}

__attribute__((noipa)) int tlevel1(int a)
{
	volatile char pad[100];
	pad[0] = (char)a;
	int r = tlevel2(a + 1);
	sink += pad[0];
	return r;
}

__attribute__((noipa)) void *thread_fn(void *arg)
{
	int r = tlevel1((int)(long)arg);
	sink += r;
	return NULL;
}

static int blocked;

__attribute__((noipa)) int cmp_block(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;
	if (!blocked) {
		blocked = 1;
		sink += leaf(x);
	}
	return (x > y) - (x < y);
}

__attribute__((noipa)) int sort_level1(int a)
{
	int v[64];
	for (int i = 0; i < 64; i++)
		v[i] = (i * 37 + a) % 64;
	qsort(v, 64, sizeof v[0], cmp_block);
	return v[a % 64];
}

__attribute__((noipa)) void on_signal(int sig)
{
	sink += leaf(sig);
}

__attribute__((noipa)) int sig_level2(int a)
{
	int b = a * 3, c = a ^ 5, d = a + 7;
	raise(SIGUSR1);
	return a + b + c + d;
}

__attribute__((noipa)) int sig_level1(int a)
{
	volatile char pad[72];
	pad[0] = (char)a;
	int r = sig_level2(a + 1);
	sink += pad[0];
	return r;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "qsort") == 0)
		return sort_level1(argc) == 12345;
	if (argc > 1 && strcmp(argv[1], "signal") == 0) {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_signal;
		sigaction(SIGUSR1, &sa, NULL);
		return sig_level1(argc) == 12345;
	}
	if (argc > 1 && strcmp(argv[1], "thread") == 0) {
		pthread_t t;
		if (pthread_create(&t, NULL, thread_fn, (void *)3L) != 0)
			abort();
		pthread_join(t, NULL);
		return 0;
	}
	return level1(argc) == 12345;
}
