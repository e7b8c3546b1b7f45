// rec_deeplib: a shared library without frame pointers between the caller
// and malloc, for the stack tests (see rec_deep.c).
#include <stdlib.h>

#define NOINLINE __attribute__((noinline))

NOINLINE void *lib_alloc(size_t size)
{
	char *p = malloc(size);
	p[0] = 1;
	__asm__ volatile("" ::: "memory");
	return p;
}

NOINLINE void *lib_mid(size_t size, int n)
{
	void *p = lib_alloc(size + (n & 0)); // same size always
	__asm__ volatile("" ::: "memory");
	return p;
}

void *lib_entry(size_t size, int n)
{
	void *p = lib_mid(size, n);
	__asm__ volatile("" ::: "memory");
	return p;
}
