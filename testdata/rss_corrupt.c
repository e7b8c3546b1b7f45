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
 *
 * rss_corrupt N MODE RATE: MODE "plain" faults from the real stack instead
 * (same work otherwise: the baseline of a cost comparison), "malloc" calls
 * malloc(64) from the hostile stack instead of faulting (heap tier; the
 * blocks are freed at the end), "malloc-plain" from the real stack; RATE > 0
 * paces the loop at RATE iterations a second.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

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

/* Calls malloc(64) with rsp (16-byte aligned) and rbp hostile; the call
 * pushes its real return address there, so malloc returns here. */
__attribute__((noinline)) void *hostile_malloc(uint64_t *rsp, uint64_t rbp)
{
	void *p;
	__asm__ volatile("mov %%rsp, %%r12\n\t"
			 "mov %%rbp, %%r13\n\t"
			 "mov %1, %%rsp\n\t"
			 "and $-16, %%rsp\n\t"
			 "mov %2, %%rbp\n\t"
			 "mov $64, %%edi\n\t"
			 "call malloc\n\t"
			 "mov %%r12, %%rsp\n\t"
			 "mov %%r13, %%rbp\n\t"
			 : "=a"(p)
			 : "r"(rsp), "r"(rbp)
			 : "r12", "r13", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2",
			   "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
			   "xmm14", "xmm15", "memory", "cc");
	return p;
}

__attribute__((noinline)) void *plain_malloc(void) { return malloc(64); }

__attribute__((noinline)) void plain_fault(char *page) { *(volatile char *)page = 1; }

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000;
	const char *mode = argc > 2 ? argv[2] : "";
	long rate = argc > 3 ? atol(argv[3]) : 0;
	int plain = !strcmp(mode, "plain") || !strcmp(mode, "malloc-plain");
	int heap = !strncmp(mode, "malloc", 6);
	stk = malloc(WORDS * 8);
	char *pages = heap ? 0 : mmap(0, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void **blocks = heap ? calloc(n, sizeof(void *)) : 0;
	if (!stk || pages == MAP_FAILED || (heap && !blocks))
		return 2;
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
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
		if (heap)
			blocks[i] = plain ? plain_malloc() : hostile_malloc(rsp, rbp);
		else if (plain)
			plain_fault(pages + i * 4096);
		else
			hostile_fault(pages + i * 4096, rsp, rbp);
		if (rate > 0 && i % 16 == 15) {
			/* Sleep until iteration i+1 is due. */
			long long due = (long long)(i + 1) * 1000000000LL / rate;
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			long long el = (now.tv_sec - t0.tv_sec) * 1000000000LL + (now.tv_nsec - t0.tv_nsec);
			if (due > el) {
				struct timespec d = {(due - el) / 1000000000LL, (due - el) % 1000000000LL};
				nanosleep(&d, 0);
			}
		}
	}
	if (heap) {
		long ok = 0;
		for (long i = 0; i < n; i++) {
			ok += blocks[i] != 0;
			free(blocks[i]);
		}
		printf("%ld of %ld blocks allocated\n", ok, n);
		return ok == n ? 0 : 1;
	}
	long sum = 0;
	for (long i = 0; i < n; i++)
		sum += pages[i * 4096];
	printf("%ld of %ld pages written\n", sum, n);
	return sum == n ? 0 : 1;
}
