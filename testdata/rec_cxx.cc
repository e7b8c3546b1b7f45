// rec_cxx: C++ operator new/delete sites with known sizes.
// Live at the end:
//   cxx::Cache::fill     1,000,000  (1000 x new char[1000])
//   cxx::make_node           48,000  (1000 x new Node, sizeof(Node) == 48)
//   cxx::churn_nodes              0  (10000 x new Node + delete)
//   cxx::big_new     268,435,456  (4096 x new char[65536], with --big)
// Usage: rec_cxx [--wait-end] [--big]
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

#define NOINLINE __attribute__((noinline))

namespace cxx {
struct Node {
	long v[6];
};
static_assert(sizeof(Node) == 48, "Node size");

std::vector<void *> *kept;

struct Cache {
	NOINLINE void fill()
	{
		for (int i = 0; i < 1000; i++) {
			char *p = new char[1000];
			p[0] = 1;
			kept->push_back(p);
		}
	}
};

NOINLINE Node *make_node() { return new Node(); }

NOINLINE void big_new()
{
	for (int i = 0; i < 4096; i++) {
		char *p = new char[65536];
		p[0] = 1;
		kept->push_back(p);
	}
}

NOINLINE void churn_nodes()
{
	for (int i = 0; i < 10000; i++) {
		Node *volatile n = new Node();
		n->v[0] = i;
		delete n;
	}
}
} // namespace cxx

int main(int argc, char **argv)
{
	cxx::kept = new std::vector<void *>();
	cxx::kept->reserve(16384);
	cxx::Cache c;
	c.fill();
	for (int i = 0; i < 1000; i++)
		cxx::kept->push_back(cxx::make_node());
	cxx::churn_nodes();
	bool wait = false;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--big"))
			cxx::big_new();
		if (!strcmp(argv[i], "--wait-end"))
			wait = true;
	}
	if (wait) {
		char line[16];
		printf("DONE\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 0;
	}
	return 0;
}
