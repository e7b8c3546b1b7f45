// C++ test program for internal/unwind: a std::thread whose stack runs
// through libstdc++'s thread trampoline (execute_native_thread_routine) into
// the program, built by the test with -O2 -fomit-frame-pointer.
//   start_thread -> execute_native_thread_routine (libstdc++) -> _M_run ->
//   lambda -> cxx_level1 -> cxx_level2 -> cxx_leaf -> read()
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

volatile int sink;

extern "C" __attribute__((noipa)) int cxx_leaf(int x)
{
	char line[64], c;
	int n = snprintf(line, sizeof line, "ready %d\n", (int)gettid());
	if (write(1, line, n) != n)
		abort();
	if (read(0, &c, 1) < 0)
		abort();
	return x + 1;
}

extern "C" __attribute__((noipa)) int cxx_level2(int x)
{
	std::vector<int> v(x + 16, x);
	std::string s(x + 40, 'a');
	int r = cxx_leaf(v[3] + (int)s.size());
	return r + v[x] + s[1];
}

extern "C" __attribute__((noipa)) int cxx_level1(int x)
{
	int b = x * 3, c = x ^ 5, d = x + 7;
	int r = cxx_level2(x + 1);
	return r + b + c + d;
}

int main()
{
	std::thread t([] { sink += cxx_level1(2); });
	t.join();
	return 0;
}
