/* Shared library for internal/unwind tests: two noinline frames that call
 * back into the executable, so one stack crosses exe -> lib -> exe. */
volatile int unw_lib_sink;

__attribute__((noipa)) int unw_lib_mid(int x, int (*cb)(int))
{
	volatile char pad[40];
	int b = x * 7, c = x ^ 9, d = x + 11, e = x - 13, f = x * x;
	pad[0] = (char)x;
	int r = cb(x + 1);
	unw_lib_sink += pad[0];
	return r + b + c + d + e + f;
}

__attribute__((noipa)) int unw_lib_entry(int x, int (*cb)(int))
{
	volatile char pad[200];
	pad[0] = (char)x;
	int r = unw_lib_mid(x * 3, cb);
	unw_lib_sink += pad[0];
	return r + 1;
}
