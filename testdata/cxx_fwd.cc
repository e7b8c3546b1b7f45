// cxx_fwd: every operator new variant a C++ program calls, with known
// sizes, plus a std::bad_alloc caught, a nothrow null and a new_handler
// that lets the retried allocation succeed. libstdc++'s operator new
// forwards to malloc (memprof records its block at malloc's return); the
// aligned one keeps its ret probes. Live at the end, by the first frame of
// the program's own (namespace fwd):
//   fwd::scalar           4,000  (100 x new S, sizeof(S) == 40)          leaf
//   fwd::array          100,000  (100 x new char[1000])                  leaf
//   fwd::nothrow_scalar   2,400  (100 x new (nothrow) S2, sizeof == 24)  leaf
//   fwd::nothrow_array  200,000  (100 x new (nothrow) char[2000])        leaf
//   fwd::aligned        409,600  (100 x new Line[64], alignas(64))       leaf
//   fwd::aligned_nothrow 819,200 (100 x operator new(8192, align 64, nothrow)) leaf
//   fwd::strings        303,300  (100 x new std::string(3000, 'x'): 32 + 3001)
//   fwd::vectors        400,000  (10 x std::vector<long> reserving 5000)
//   fwd::handled     50,331,648  (new char[48 MiB] failing under RLIMIT_AS;
//                                 the new_handler raises the limit, the retry succeeds) leaf
// Prints "caught=1 nulls=1 handler=1" and exits 0 (3 if it printed anything
// else).
// Usage: cxx_fwd [--wait-start] [--wait-end]
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <sys/resource.h>
#include <unistd.h>
#include <vector>

#define NOINLINE __attribute__((noinline))

void *volatile keep[1024];
static volatile size_t huge = (size_t)1 << 60; // 1 EiB: always fails

namespace fwd {
struct S {
	long v[5];
};
static_assert(sizeof(S) == 40, "S size");
struct S2 {
	long v[3];
};
static_assert(sizeof(S2) == 24, "S2 size");
struct alignas(64) Line {
	char b[64];
};

std::string *strs[100];
std::vector<long> *vecs[10];
static struct rlimit saved_as;
static int handler_calls;

NOINLINE void scalar(int i) { keep[i] = new S(); }
NOINLINE void array(int i) { keep[100 + i] = new char[1000]; }
NOINLINE void nothrow_scalar(int i) { keep[200 + i] = new (std::nothrow) S2(); }
NOINLINE void nothrow_array(int i) { keep[300 + i] = new (std::nothrow) char[2000]; }
NOINLINE void aligned(int i) { keep[400 + i] = new Line[64]; }
NOINLINE void aligned_nothrow(int i)
{
	keep[500 + i] = ::operator new(8192, std::align_val_t(64), std::nothrow);
}
NOINLINE void strings(int i) { strs[i] = new std::string(3000, 'x'); }
NOINLINE void vectors(int i)
{
	vecs[i] = new std::vector<long>();
	vecs[i]->reserve(5000);
}

NOINLINE bool try_huge()
{
	try {
		keep[900] = new char[huge];
		return true;
	} catch (const std::bad_alloc &) {
		return false;
	}
}

NOINLINE bool try_huge_nothrow() { return (keep[901] = new (std::nothrow) char[huge]) != nullptr; }

// on_no_memory raises the address-space limit back: no allocator call, so
// the retry in operator new is still the same call.
static void on_no_memory()
{
	handler_calls++;
	setrlimit(RLIMIT_AS, &saved_as);
	std::set_new_handler(nullptr);
}

NOINLINE void handled() { keep[902] = new char[48 << 20]; }
} // namespace fwd

static void wait_line(const char *say)
{
	char line[64];
	printf("%s\n", say);
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		line[0] = 0;
}

// vm_bytes is the process's address-space size (/proc/self/statm).
static size_t vm_bytes()
{
	FILE *f = fopen("/proc/self/statm", "r");
	unsigned long pages = 0;
	if (f) {
		if (fscanf(f, "%lu", &pages) != 1)
			pages = 0;
		fclose(f);
	}
	return pages * (size_t)sysconf(_SC_PAGESIZE);
}

int main(int argc, char **argv)
{
	bool wait_start = false, wait_end = false;
	for (int i = 1; i < argc; i++) {
		wait_start |= strcmp(argv[i], "--wait-start") == 0;
		wait_end |= strcmp(argv[i], "--wait-end") == 0;
	}
	if (wait_start)
		wait_line("READY");
	int caught = !fwd::try_huge();
	int nulls = !fwd::try_huge_nothrow();
	for (int i = 0; i < 100; i++) {
		fwd::scalar(i);
		fwd::array(i);
		fwd::nothrow_scalar(i);
		fwd::nothrow_array(i);
		fwd::aligned(i);
		fwd::aligned_nothrow(i);
		fwd::strings(i);
	}
	for (int i = 0; i < 10; i++)
		fwd::vectors(i);
	// 16 MiB of address space left: the 48 MiB block fails until the
	// handler lifts the limit.
	getrlimit(RLIMIT_AS, &fwd::saved_as);
	struct rlimit tight = fwd::saved_as;
	tight.rlim_cur = vm_bytes() + (16 << 20);
	setrlimit(RLIMIT_AS, &tight);
	std::set_new_handler(fwd::on_no_memory);
	fwd::handled();
	printf("caught=%d nulls=%d handler=%d\n", caught, nulls, fwd::handler_calls);
	fflush(stdout);
	if (wait_end)
		wait_line("DONE");
	return caught == 1 && nulls == 1 && fwd::handler_calls == 1 ? 0 : 3;
}
