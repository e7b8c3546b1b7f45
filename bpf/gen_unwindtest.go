package bpf

// The test-only object of unwind.h (BPF_PROG_RUN tests and benchmarks in
// internal/unwindtable); its own bpf2go invocation so production objects
// stay as they are.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type uw_row -type uw_rule -type uw_object -type uw_mapping -type uw_proc -type uw_snapshot -type uw_test_in -type uw_test_out -type uw_cfa_kind -type uw_ra_kind -type uw_bp_kind -type uw_status -type uw_object_state -type uw_intern_result -type uw_stack Unwindtest unwindtest.bpf.c -- -I.

// The same walk in its production build (bpf_probe_read_user of the live
// stack) behind a uprobe, for the tests.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type uw_probe_out Unwindprobe unwindprobe.bpf.c -- -I.
