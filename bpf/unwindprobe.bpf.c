//go:build ignore

// SPDX-License-Identifier: GPL-2.0
// Test-only uprobe around unwind.h's production build (walk and intern): the walk reads the
// live stack of the probed thread with bpf_probe_read_user, from the probe's
// pt_regs, exactly as a tier's program will (internal/unwindtable's tests).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "unwind.h"

char LICENSE[] SEC("license") = "GPL";

struct uw_probe_out {
	__u32 n;
	__u32 status;	// enum uw_status
	__u64 calls;	// probe hits
	__u64 ns;	// time of the last walk
	__u64 ns_total; // time of all walks
	__u64 frames;	// frames of all walks
	__u64 stack_id; // uw_intern's key of the last stack
	__u64 pcs[UW_MAX_FRAMES];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uw_probe_out);
} probe_out SEC(".maps");

SEC("uprobe")
int uw_probe(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct uw_probe_out *out = bpf_map_lookup_elem(&probe_out, &zero);
	if (!out)
		return 0;
	__u64 t0 = bpf_ktime_get_ns();
	struct uw_state *s = uw_walk(bpf_get_current_pid_tgid() >> 32, PT_REGS_IP(ctx),
				     PT_REGS_SP(ctx), PT_REGS_FP(ctx));
	if (s)
		out->stack_id = uw_intern(s); // timed too: a tier interns every stack
	__u64 dt = bpf_ktime_get_ns() - t0;
	out->ns = dt;
	out->ns_total += dt;
	out->calls++;
	if (!s)
		return 0;
	out->frames += s->stack.n;
	out->n = s->stack.n;
	out->status = s->stack.status;
	bpf_probe_read_kernel(out->pcs, sizeof(out->pcs), s->stack.pcs);
	uw_release(s);
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 1024);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, UW_MAX_FRAMES * sizeof(__u64));
} fp_stacks SEC(".maps");

// fp_probe times bpf_get_stackid's frame-pointer walk and interning at the
// same probe, for comparison (what memprof's frame-pointer mode pays per
// sample).
SEC("uprobe")
int fp_probe(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct uw_probe_out *out = bpf_map_lookup_elem(&probe_out, &zero);
	if (!out)
		return 0;
	__u64 t0 = bpf_ktime_get_ns();
	long id = bpf_get_stackid(ctx, &fp_stacks, BPF_F_USER_STACK);
	__u64 dt = bpf_ktime_get_ns() - t0;
	out->ns = dt;
	out->ns_total += dt;
	out->calls++;
	out->stack_id = id;
	return 0;
}
