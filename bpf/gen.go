// Package bpf holds memprof's BPF programs (memprof.bpf.c, memprof.h), the
// kernel type header they are compiled against (vmlinux.h, from
// `bpftool btf dump file /sys/kernel/btf/vmlinux format c`), and the Go
// loader bpf2go generates from them. The generated files are committed so
// building memprof needs no clang; `make generate` rebuilds them.
package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type live_key -type live_block -type alloc_key -type oom_event -type stack_event -type thread_state Memprof memprof.bpf.c -- -I.
