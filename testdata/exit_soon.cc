// exit_soon: allocates a known amount, holds it briefly and exits, for the
// tests of targets that exit during a recording.
//
// Live at its exit (the truth the tests assert):
//   keep_malloc   4,194,304  (64 x malloc(65536))
//   keep_new      4,194,304  (64 x new char[65536])
//   leaf_malloc     100,000  (100 x malloc(1000), from a deep non-inlined chain,
//                             so CFI unwinding has something to walk)
//
// Usage: exit_soon [--hold MS] [--wait-end] [--preload LIB] [--exec PATH ARGS...]
//   Prints "READY" and waits for a line on stdin, allocates, prints "DONE",
//   holds the blocks for MS milliseconds (default 50) and exits with status 0.
//   --wait-end   after DONE, wait for a second line on stdin before holding
//   --exec       after DONE and the hold, exec PATH ARGS (the blocks of this
//                image are gone with it)
//   --preload    set LD_PRELOAD=LIB for the program --exec runs
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static void *volatile sink[1024];
static int nsink;

static void keep(void *p)
{
	if (p == nullptr) {
		std::fprintf(stderr, "allocation failed\n");
		std::exit(2);
	}
	std::memset(p, 1, 64);
	sink[nsink++] = p;
}

NOINLINE void keep_malloc()
{
	for (int i = 0; i < 64; i++)
		keep(std::malloc(65536));
}

NOINLINE void keep_new()
{
	for (int i = 0; i < 64; i++)
		keep(new char[65536]);
}

NOINLINE void leaf_malloc()
{
	for (int i = 0; i < 100; i++)
		keep(std::malloc(1000));
}

NOINLINE void chain3() { leaf_malloc(); }
NOINLINE void chain2() { chain3(); }
NOINLINE void chain1() { chain2(); }

int main(int argc, char **argv)
{
	long hold = 50;
	bool wait_end = false;
	char **exec_argv = nullptr;
	for (int i = 1; i < argc; i++) {
		if (!std::strcmp(argv[i], "--hold") && i + 1 < argc)
			hold = std::atol(argv[++i]);
		else if (!std::strcmp(argv[i], "--wait-end"))
			wait_end = true;
		else if (!std::strcmp(argv[i], "--preload") && i + 1 < argc)
			setenv("LD_PRELOAD", argv[++i], 1);
		else if (!std::strcmp(argv[i], "--exec") && i + 1 < argc) {
			exec_argv = &argv[i + 1];
			break;
		}
	}
	char line[64];
	std::printf("READY\n");
	std::fflush(stdout);
	if (!std::fgets(line, sizeof line, stdin))
		return 1;
	keep_malloc();
	keep_new();
	chain1();
	std::printf("DONE\n");
	std::fflush(stdout);
	if (wait_end && !std::fgets(line, sizeof line, stdin))
		return 1;
	struct timespec ts = {hold / 1000, (hold % 1000) * 1000000};
	nanosleep(&ts, nullptr);
	if (exec_argv) {
		execv(exec_argv[0], exec_argv);
		std::perror("execv");
		return 3;
	}
	return 0;
}
