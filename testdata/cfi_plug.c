// A plugin built without frame pointers (-O2 -fomit-frame-pointer), loaded
// with dlopen after the program started: its frames sit between the
// program's code and malloc (TestCFIFieldCases).
#include <stdlib.h>
#include <string.h>

void *volatile plug_keep;

__attribute__((noinline)) static void *plug_inner(size_t n)
{
	char *p = malloc(n);
	memset(p, 1, n);
	return p;
}

__attribute__((noinline)) void plug_outer(size_t n)
{
	plug_keep = plug_inner(n);
	__asm__ volatile("" ::: "memory"); // not a tail call
}
