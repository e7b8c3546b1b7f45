// Package callstest tests the allocator-call logic of bpf/calls.h through
// BPF_PROG_RUN: its test program (../calls_test.bpf.c) includes the same
// header as memprof's production programs and runs the logic on probe hits
// the Go table test gives explicitly. `make generate` rebuilds the generated
// files.
package callstest

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type test_op -type test_result -type thread_state -type live_key -type live_block Calls ../calls_test.bpf.c -- -I..
