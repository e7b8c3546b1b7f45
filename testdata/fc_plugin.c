// fc_plugin: a plugin loaded with dlopen after the start, built by the tests
// with -O2 -fomit-frame-pointer -shared -fPIC. See fc_dlmain.c for the truth.
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

extern void *volatile kept[];

NOINLINE void *plug_inner(size_t n)
{
	void *p = malloc(n);
	if (p)
		memset(p, 5, n);
	__asm__ volatile("" ::: "memory");
	return p;
}

NOINLINE void plug_outer(int k)
{
	for (int i = 0; i < k; i++)
		kept[i] = plug_inner(512 << 10);
	__asm__ volatile("" ::: "memory");
}
