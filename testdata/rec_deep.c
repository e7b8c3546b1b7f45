// rec_deep: allocation sites deep in call chains, for the stack tests. Built
// by the tests with -O2 -fomit-frame-pointer (as distro C is), linked with
// librec_deeplib.so (testdata/rec_deeplib.c, also without frame pointers).
// Live at the end, every block allocated under
//   main -> level1 -> level2 -> level3 -> level4 -> level5 -> level6 -> ...
//   deep_leak        1000 x malloc(1024)   (... -> level6 -> deep_leak)
//   recurse x5       500 x malloc(2048)    (... -> level6 -> recurse x5 -> lib_entry -> lib_mid -> lib_alloc)
// Usage: rec_deep (prints DONE and waits for a line before exiting)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

void *lib_entry(size_t size, int n);

void *volatile sink[4096];
int nsink;

NOINLINE void deep_leak(void)
{
	for (int i = 0; i < 1000; i++) {
		char *p = malloc(1024);
		p[0] = 1;
		sink[nsink++] = p;
	}
	__asm__ volatile("" ::: "memory");
}

NOINLINE int recurse(int depth)
{
	if (depth > 1) {
		int r = recurse(depth - 1);
		__asm__ volatile("" ::: "memory");
		return r + 1;
	}
	for (int i = 0; i < 500; i++)
		sink[nsink++] = lib_entry(2048, i);
	return 1;
}

NOINLINE void level6(void) { deep_leak(); recurse(5); __asm__ volatile("" ::: "memory"); }
NOINLINE void level5(void) { level6(); __asm__ volatile("" ::: "memory"); }
NOINLINE void level4(void) { level5(); __asm__ volatile("" ::: "memory"); }
NOINLINE void level3(void) { level4(); __asm__ volatile("" ::: "memory"); }
NOINLINE void level2(void) { level3(); __asm__ volatile("" ::: "memory"); }
NOINLINE void level1(void) { level2(); __asm__ volatile("" ::: "memory"); }

int main(void)
{
	char line[16];
	level1();
	printf("DONE\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 0;
	return 0;
}
