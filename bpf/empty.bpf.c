//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// Empty probes for `make bench`, attached at the same sites as memprof's
// programs: they measure the floor every uprobe pays (the trap), against
// which memprof's own cost is judged. Kept out of the production object.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("uprobe")
int empty_enter(struct pt_regs *ctx)
{
	return 0;
}

SEC("uretprobe")
int empty_return(struct pt_regs *ctx)
{
	return 0;
}

SEC("uprobe.multi")
int empty_enter_multi(struct pt_regs *ctx)
{
	return 0;
}

SEC("uretprobe.multi")
int empty_return_multi(struct pt_regs *ctx)
{
	return 0;
}

// An empty session program that never asks for the return: the floor of
// session uprobes (one trap per call).
SEC("uprobe.session")
int empty_session(struct pt_regs *ctx)
{
	return 1;
}
