// exc_new: C++ exceptions through operator new, and the nothrow and aligned
// variants, with known live bytes. memprof must not change what it does
// (a return probe on operator new made the first bad_alloc end in
// std::terminate).
// Live at the end (3 failed calls of each kind come first, and count nowhere):
//   exc::after           100,000  (100 x new char[1000])
//   exc::after_nothrow   200,000  (100 x new (nothrow) char[2000])
//   exc::after_aligned   409,600  (100 x new (align 64) char[4096])
//   exc::after_aligned_nothrow 819,200 (100 x new (align 64, nothrow) char[8192])
// Prints "caught=N" (N = 6: 3 throwing, 3 aligned throwing) and "nulls=N"
// (N = 6: 3 nothrow, 3 aligned nothrow) and exits 0.
// Usage: exc_new [--wait-start] [--wait-end] [--signal]
// --wait-start/--wait-end print READY/DONE and wait for a line on stdin, or
// with --signal for SIGUSR1 (a detached container has no stdin).
#include <csignal>
#include <cstdio>
#include <cstring>
#include <new>

#define NOINLINE __attribute__((noinline))

void *volatile keep[4096];
static volatile size_t huge = (size_t)1 << 60; // 1 EiB: always fails

namespace exc {
struct alignas(64) Line {
	char b[64];
};

NOINLINE bool try_huge()
{
	try {
		keep[0] = new char[huge];
		return true;
	} catch (const std::bad_alloc &) {
		return false;
	}
}

NOINLINE bool try_huge_aligned()
{
	try {
		keep[1] = new Line[huge / 64];
		return true;
	} catch (const std::bad_alloc &) {
		return false;
	}
}

NOINLINE bool try_huge_nothrow() { return (keep[2] = new (std::nothrow) char[huge]) != nullptr; }

NOINLINE bool try_huge_aligned_nothrow()
{
	return (keep[3] = ::operator new(huge, std::align_val_t(64), std::nothrow)) != nullptr;
}

NOINLINE void after(int i) { keep[10 + i] = new char[1000]; }
NOINLINE void after_nothrow(int i) { keep[200 + i] = new (std::nothrow) char[2000]; }
NOINLINE void after_aligned(int i) { keep[400 + i] = new Line[64]; }
NOINLINE void after_aligned_nothrow(int i)
{
	keep[600 + i] = ::operator new(8192, std::align_val_t(64), std::nothrow);
}
} // namespace exc

static bool use_signal;
static volatile sig_atomic_t got_usr1;
static void on_usr1(int) { got_usr1 = 1; }

static void wait_line(const char *say)
{
	char line[64];
	printf("%s\n", say);
	fflush(stdout);
	if (use_signal) {
		// SIGUSR1 is blocked from main's start: none is lost before this
		sigset_t none;
		sigemptyset(&none);
		while (!got_usr1)
			sigsuspend(&none);
		got_usr1 = 0;
		return;
	}
	if (!fgets(line, sizeof line, stdin))
		return;
}

int main(int argc, char **argv)
{
	bool wait_start = false, wait_end = false;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--wait-start"))
			wait_start = true;
		else if (!strcmp(argv[i], "--wait-end"))
			wait_end = true;
		else if (!strcmp(argv[i], "--signal"))
			use_signal = true;
	}
	if (use_signal) {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_usr1;
		sigaction(SIGUSR1, &sa, nullptr);
		sigset_t usr1;
		sigemptyset(&usr1);
		sigaddset(&usr1, SIGUSR1);
		sigprocmask(SIG_BLOCK, &usr1, nullptr);
	}
	if (wait_start)
		wait_line("READY");
	int caught = 0, nulls = 0;
	for (int k = 0; k < 3; k++) {
		caught += !exc::try_huge();
		caught += !exc::try_huge_aligned();
		nulls += !exc::try_huge_nothrow();
		nulls += !exc::try_huge_aligned_nothrow();
	}
	for (int i = 0; i < 100; i++) {
		exc::after(i);
		exc::after_nothrow(i);
		exc::after_aligned(i);
		exc::after_aligned_nothrow(i);
	}
	printf("caught=%d\nnulls=%d\n", caught, nulls);
	fflush(stdout);
	if (wait_end)
		wait_line("DONE");
	return 0;
}
