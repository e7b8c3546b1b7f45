// bench_new: bench_pairs.c with operator new + operator delete pairs, for
// `make bench` (the C++ entry points take their results at ret instructions).
#define BENCH_NEW
#include "bench_pairs.c"
