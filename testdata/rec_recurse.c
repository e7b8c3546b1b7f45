// rec_recurse: one block deeper than any stack walk reaches, for the stack
// tests. recurse(300) calls itself 300 times, then allocates 1 MiB
// (malloc, touched) at the bottom, keeps it, and returns; main exits 0.
// Truth: 1,048,576 live bytes under recurse x 301 <- main: more than the
// 127 frames a walk keeps, so a profile must show that stack cut
// ([truncated]), never as complete.
#include <stdlib.h>
#include <string.h>

void *volatile keep;

__attribute__((noinline)) int recurse(int n)
{
	if (n == 0) {
		keep = malloc(1 << 20);
		memset(keep, 1, 1 << 20);
		return 1;
	}
	return recurse(n - 1) + 1;
}

int main(void)
{
	return recurse(300) == 301 ? 0 : 1;
}
