/* rss_corrupt N: a hostile stack for the RSS tier's stack walks. N times it
 * fills a 64 KiB heap buffer with hostile words, points rsp and rbp into it
 * and faults one fresh anonymous page from there (hostile_fault: no call and
 * no signal while rsp is hostile), then restores them. The words cycle
 * through four kinds: random; pointers into the buffer; a frame-pointer
 * chain through the buffer (wrapping around) with code addresses as return
 * addresses; frames that point at themselves. It then checks that every
 * page holds what it wrote and exits 0 (1 if not).
 *
 * Truth: N pages (N x 4096 bytes) faulted in hostile_fault, whose callers
 * cannot be known: a stack walk must end (no hang), leave the program as it
 * was, and mark what it could not finish as [truncated].
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define WORDS 8192

static uint64_t *stk;
static uint64_t rnd = 88172645463325252ULL;

static uint64_t xorshift(void)
{
	rnd ^= rnd << 13;
	rnd ^= rnd >> 7;
	rnd ^= rnd << 17;
	return rnd;
}

__attribute__((noinline)) void hostile_fault(char *page, uint64_t *rsp, uint64_t rbp)
{
	__asm__ volatile("mov %%rsp, %%r12\n\t"
			 "mov %%rbp, %%r13\n\t"
			 "mov %1, %%rsp\n\t"
			 "mov %2, %%rbp\n\t"
			 "movb $1, (%0)\n\t"
			 "mov %%r12, %%rsp\n\t"
			 "mov %%r13, %%rbp\n\t" ::"r"(page),
			 "r"(rsp), "r"(rbp)
			 : "r12", "r13", "memory");
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000;
	stk = malloc(WORDS * 8);
	char *pages = mmap(0, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!stk || pages == MAP_FAILED)
		return 2;
	uint64_t code[] = {(uint64_t)main, (uint64_t)hostile_fault + 5, (uint64_t)printf, (uint64_t)malloc + 3};
	for (long i = 0; i < n; i++) {
		int kind = i % 4;
		for (int w = 0; w < WORDS; w++) {
			uint64_t r = xorshift();
			switch (kind) {
			case 0:
				stk[w] = r;
				break;
			case 1:
				stk[w] = (uint64_t)&stk[r % WORDS];
				break;
			case 2:
				stk[w] = (w & 1) ? code[r % 4] : (uint64_t)&stk[(w + 2) % WORDS];
				break;
			default:
				stk[w] = (w & 1) ? code[r % 4] : (uint64_t)&stk[w];
			}
		}
		uint64_t *rsp = &stk[WORDS / 2 + xorshift() % 64];
		uint64_t rbp = kind == 0 ? xorshift() : (uint64_t)&stk[WORDS / 2 + (xorshift() % 64) * 2];
		hostile_fault(pages + i * 4096, rsp, rbp);
	}
	long sum = 0;
	for (long i = 0; i < n; i++)
		sum += pages[i * 4096];
	printf("%ld of %ld pages written\n", sum, n);
	return sum == n ? 0 : 1;
}
