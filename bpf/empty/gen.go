// Package empty holds the benchmark's empty uprobe programs (../empty.bpf.c),
// a BPF object of their own so that they are not part of memprof's
// production object. `make generate` rebuilds the generated files.
package empty

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 Empty ../empty.bpf.c -- -I..
