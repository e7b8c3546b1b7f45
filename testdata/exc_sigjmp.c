// exc_sigjmp: siglongjmp out of a signal handler raised inside an allocator
// call (glibc's realloc aborts on a pointer it did not allocate; jemalloc
// crashes or aborts on it too), then allocations of the same thread at a
// given stack depth. The abandoned call must not hide the later ones.
// Usage: exc_sigjmp BAD_DEPTH OK_DEPTH [--wait-start] [--wait-end]
// Live at the end: one 100,000 (100 x malloc(1000)); prints "jumped 1".
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

void *volatile keep[4096];
static sigjmp_buf jb;
static volatile int jumped;
static char fake[64] __attribute__((aligned(16)));

static void on_signal(int s)
{
	(void)s;
	jumped++;
	siglongjmp(jb, 1);
}

static char *volatile not_heap = fake + 16; // hides the bad pointer from the compiler
NOINLINE void bad(void) { keep[0] = realloc(not_heap, 5000); }

NOINLINE void deep(int d, void (*fn)(void))
{
	volatile char pad[256];
	pad[0] = d;
	if (d > 0)
		deep(d - 1, fn);
	else
		fn();
}

static int I;
NOINLINE void one(void)
{
	keep[10 + I] = malloc(1000);
	I++;
}

static void wait_line(const char *say)
{
	char line[64];
	printf("%s\n", say);
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	int badd = atoi(argv[1]), okd = atoi(argv[2]);
	int wait_start = 0, wait_end = 0;
	for (int i = 3; i < argc; i++) {
		wait_start |= !strcmp(argv[i], "--wait-start");
		wait_end |= !strcmp(argv[i], "--wait-end");
	}
	signal(SIGABRT, on_signal);
	signal(SIGSEGV, on_signal);
	if (wait_start)
		wait_line("READY");
	if (sigsetjmp(jb, 1) == 0)
		deep(badd, bad);
	for (int i = 0; i < 100; i++)
		deep(okd, one);
	printf("jumped %d\n", jumped);
	fflush(stdout);
	if (wait_end)
		wait_line("DONE");
	return 0;
}
