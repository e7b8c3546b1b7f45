// fwd_header_main: linked against fwd_header_new.cc's library, whose
// operator new(n) keeps a 64-byte header and returns a block of n bytes.
// Live at the end, by the program's caller of new:
//   f_big   1,000,640  (10 x new char[100000]: 10 x (100,000 + 64))
//   f_obj      50,640  (10 x new S, sizeof(S) == 5000: 10 x (5,000 + 64))
// Prints "headers=20" and exits 0.
#include <cstdio>

#define NOINLINE __attribute__((noinline))

extern volatile int fwd_nheaders;
void *volatile keep[32];
struct S {
	char b[5000];
};

NOINLINE void f_big()
{
	for (int i = 0; i < 10; i++)
		keep[i] = new char[100000];
}

NOINLINE void f_obj()
{
	for (int i = 0; i < 10; i++)
		keep[10 + i] = new S;
}

int main()
{
	f_big();
	f_obj();
	printf("headers=%d\n", fwd_nheaders);
	return 0;
}
