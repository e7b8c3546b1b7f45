// fwd_header_new: a shared library, built as libstdc++-fwdheader.so (so
// memprof takes it for a libstdc++ and probes its operator new), whose
// operator new looks like libstdc++'s to internal/attach (it calls malloc
// through the PLT and never writes rbp: build it with -fomit-frame-pointer)
// but calls malloc twice: a 64-byte header it keeps, then the block. A
// hostile or unusual C++ runtime a target may ship; memprof must record
// each malloc at the size asked for. See fwd_header_main.cc for the truth.
#include <cstdlib>
#include <new>

void *volatile fwd_headers[1024];
volatile int fwd_nheaders;

void *operator new(std::size_t n)
{
	void *h = malloc(64);
	fwd_headers[fwd_nheaders++ % 1024] = h;
	void *p = malloc(n);
	if (!p)
		throw std::bad_alloc();
	return p;
}
void *operator new[](std::size_t n) { return operator new(n); }
void operator delete(void *p) noexcept { free(p); }
void operator delete(void *p, std::size_t) noexcept { free(p); }
void operator delete[](void *p) noexcept { free(p); }
