//go:build ignore

// SPDX-License-Identifier: GPL-2.0
// Test-only programs for unwind.h, run through BPF_PROG_RUN from
// internal/unwindtable's tests: the walk reads a captured stack snapshot
// (UW_SNAPSHOT) instead of the current task's stack.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define UW_SNAPSHOT
#include "unwind.h"

char LICENSE[] SEC("license") = "GPL";

#define UW_BENCH_REPS 16

struct uw_test_in {
	__u32 pid;
	__u32 pad;
	__u64 ip, sp, bp;
};

struct uw_test_out {
	__u32 n;
	__u32 status;	// enum uw_status
	__u64 ns;	// bench programs: total ns of UW_BENCH_REPS walks
	__s64 err;	// bpf_get_stack's result (fp_bench)
	__u64 stack_id; // uw_intern's key (uw_test)
	__u64 pcs[UW_MAX_FRAMES];
};

// Makes the enums part of the BTF so bpf2go generates them for Go.
struct uw_enums {
	enum uw_cfa_kind cfa;
	enum uw_ra_kind ra;
	enum uw_bp_kind bp;
	enum uw_status status;
	enum uw_object_state state;
	enum uw_intern_result intern;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uw_test_in);
} test_in SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uw_test_out);
} test_out SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uw_enums);
} test_enums SEC(".maps");

// uw_test walks the snapshot once and copies the frames to test_out.
SEC("raw_tracepoint/uw_test")
int uw_test(void *ctx)
{
	__u32 zero = 0;
	struct uw_test_in *in = bpf_map_lookup_elem(&test_in, &zero);
	struct uw_test_out *out = bpf_map_lookup_elem(&test_out, &zero);
	if (!in || !out)
		return 0;
	struct uw_state *s = uw_walk(in->pid, in->ip, in->sp, in->bp);
	if (!s) {
		out->n = 0;
		out->status = UW_BUSY;
		return 0;
	}
	out->n = s->stack.n;
	out->status = s->stack.status;
	bpf_probe_read_kernel(out->pcs, sizeof(out->pcs), s->stack.pcs);
	out->stack_id = uw_intern(s);
	uw_release(s);
	return 0;
}

// uw_bench times UW_BENCH_REPS walks of the snapshot.
SEC("raw_tracepoint/uw_bench")
int uw_bench(void *ctx)
{
	__u32 zero = 0;
	struct uw_test_in *in = bpf_map_lookup_elem(&test_in, &zero);
	struct uw_test_out *out = bpf_map_lookup_elem(&test_out, &zero);
	if (!in || !out)
		return 0;
	__u64 t0 = bpf_ktime_get_ns();
	struct uw_state *s = NULL;
	for (int i = 0; i < UW_BENCH_REPS; i++) {
		s = uw_walk(in->pid, in->ip, in->sp, in->bp);
		if (!s)
			break;
		out->n = s->stack.n;
		out->status = s->stack.status;
		uw_release(s);
	}
	out->ns = bpf_ktime_get_ns() - t0;
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64[UW_MAX_FRAMES]);
} fp_buf SEC(".maps");

// fp_bench times UW_BENCH_REPS frame-pointer walks of the calling
// thread's own user stack by bpf_get_stack (what memprof's frame-pointer
// mode does per sample).
SEC("raw_tracepoint/fp_bench")
int fp_bench(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 zero = 0;
	struct uw_test_out *out = bpf_map_lookup_elem(&test_out, &zero);
	__u64 *buf = bpf_map_lookup_elem(&fp_buf, &zero);
	if (!out || !buf)
		return 0;
	long r = 0;
	__u64 t0 = bpf_ktime_get_ns();
	for (int i = 0; i < UW_BENCH_REPS; i++)
		r = bpf_get_stack(ctx, buf, UW_MAX_FRAMES * 8, BPF_F_USER_STACK);
	out->ns = bpf_ktime_get_ns() - t0;
	out->err = r;
	out->n = r > 0 ? (__u64)r / 8 : 0;
	return 0;
}
