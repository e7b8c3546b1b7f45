// fc_cxx: blocks that libstdc++ allocates on behalf of the caller (string
// construction and growth: _M_construct, _M_mutate, _M_create, operator new,
// all without frame pointers in Debian's libstdc++). Built by the tests with
// -O2 -fno-omit-frame-pointer. Truth, live at exit, each block under
// fc_<name> <- main:
//   fc_string   new std::string(70000, 'z'): 32 B object + 70,001 B buffer     = 70,033 B
//   fc_append   new std::string, 500 appends of 200 B: 32 B object + a buffer of
//               capacity >= 100,000 (doubling growth)                       100,033..200,033 B
//   fc_vector   new std::vector<int>(25,000): 24 B object + 100,000 B           = 100,024 B
// Usage: fc_cxx (runs and exits 0)
#include <string>
#include <vector>

#define NOINLINE __attribute__((noinline))

void *volatile kept[8];

NOINLINE void fc_string() { kept[0] = new std::string(70000, 'z'); }

NOINLINE void fc_append()
{
	auto *s = new std::string();
	for (int i = 0; i < 500; i++)
		s->append(200, 'y');
	kept[1] = s;
}

NOINLINE void fc_vector() { kept[2] = new std::vector<int>(25000); }

int main()
{
	fc_string();
	fc_append();
	fc_vector();
	return 0;
}
