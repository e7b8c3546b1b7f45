// std::string built and grown inside libstdc++ (no frame pointers in
// Debian's build) for functions of a program built without them
// (TestCFIFieldCases). Blocks live at exit:
//   f_string: new std::string(100000, 'x'): the 32-byte object and its
//             100,001-byte buffer (allocated in _M_construct)
//   f_append: new std::string grown by 1,000 appends of 100 bytes: the
//             object and its last buffer (capacity is libstdc++'s choice,
//             at least 100,001 bytes)
#include <string>

std::string *volatile keep_string, *volatile keep_append;

__attribute__((noinline)) void f_string() { keep_string = new std::string(100000, 'x'); __asm__ volatile("" ::: "memory"); }

__attribute__((noinline)) void f_append()
{
	auto *s = new std::string();
	for (int i = 0; i < 1000; i++)
		s->append(100, 'y');
	keep_append = s;
	__asm__ volatile("" ::: "memory");
}

int main()
{
	f_string();
	f_append();
	return 0;
}
