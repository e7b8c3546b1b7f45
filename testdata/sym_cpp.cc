// Test program for internal/symbolize: C++ namespaces, templates and class
// methods. Prints "<tag> <addr-hex> <line>" per capture, then blocks on stdin.
#include <cstdio>
#include <unistd.h>

extern "C" __attribute__((noinline, noipa)) void *sym_capture(void) {
	return __builtin_return_address(0);
}

namespace symns {

template <typename T> struct Box {
	T v;
	__attribute__((noinline)) void *method(T x);
};

template <typename T> void *Box<T>::method(T x) {
	v = x; void *ra = sym_capture(); std::printf("template %p %d\n", ra, __LINE__);
	return ra;
}

class Widget {
public:
	__attribute__((noinline)) void *run(int n);
	__attribute__((noinline)) static void *make();
};

void *Widget::run(int n) {
	void *ra = sym_capture(); std::printf("method %p %d %d\n", ra, __LINE__, n);
	return ra;
}

void *Widget::make() {
	void *ra = sym_capture(); std::printf("static %p %d\n", ra, __LINE__);
	return ra;
}

} // namespace symns

int main() {
	symns::Box<int> b;
	b.method(3);
	symns::Widget w;
	w.run(1);
	symns::Widget::make();
	std::printf("ready\n");
	std::fflush(stdout);
	char buf[16];
	while (read(0, buf, sizeof buf) > 0) {
	}
	return 0;
}
