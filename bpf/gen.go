// Package bpf holds memprof's BPF programs (memprof.bpf.c, with the call
// logic in calls.h and the types shared with Go in memprof.h), the kernel
// type header they are compiled against (vmlinux.h, from
// `bpftool btf dump file /sys/kernel/btf/vmlinux format c`), and the Go
// loader bpf2go generates from them: every struct and enum Go shares with
// the C side is generated (-type), never copied by hand. The generated files
// are committed so building memprof needs no clang; `make generate` rebuilds
// them. The benchmark's empty programs (package empty) and the call-logic
// test programs (package callstest) are objects of their own.
package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type live_key -type live_block -type alloc_key -type ret_stack -type oom_event -type stack_event -type thread_state Memprof memprof.bpf.c -- -I.
