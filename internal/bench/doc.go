// Package bench is memprof's overhead benchmark (`make bench`): the cost of
// a malloc+free pair in a real C program (testdata/bench_pairs.c) with no
// probes, with empty probes at memprof's sites (the floor every uprobe pays),
// with empty probes at each function's first instruction (what memprof's
// probe-site choice saves), and with memprof's programs at the default
// sample rate and at rate 1, for glibc and for jemalloc.
//
// Run it as root:
//
//	GOFLAGS=-mod=mod go test -run '^$' -bench . -benchtime=1x ./internal/bench/
//
// b.N is ignored: the C program does its own timing (CLOCK_MONOTONIC around
// the loop only, adaptive to a time budget, split in rounds), so
// every benchmark invocation runs the program exactly once and reports its
// ns/pair; use -benchtime=1x so the framework does not invoke it again to
// grow b.N. With -count=N the summary shows the median of the N runs.
// The figure reported is the fastest round's (other work on the machine only
// ever adds time; the logs give the median and slowest too).
// Flags after -args: -budget (timed loop per configuration, default 1s),
// -rounds (default 10), -sizes (default 64,4096), -pin (a CPU to pin the
// workload to; default -1, not pinned: on a 2-core VM shared with other
// work, pinning made figures worse, not steadier).
package bench
