//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// Test programs for the call logic of calls.h, run from Go with
// BPF_PROG_RUN (package callstest): the test writes one probe hit and the
// thread's state into maps, runs test_call, and reads the state, the result,
// the live map and the counters back. Not part of memprof's production
// object.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "calls.h"

char LICENSE[] SEC("license") = "GPL";

enum test_op_kind {
	T_ENTER = 1,  // call_enter with the kind in in.cookie
	T_RETURN = 2, // call_return; a block to record goes into live
	T_TAIL = 3,   // call_tail
};

// The fake stack id of blocks the test program records.
#define TEST_STACK_ID 7

struct test_op {
	struct call_in in;
	__u32 op; // enum test_op_kind
	__u32 _pad;
};

struct test_result {
	__u64 ret; // call_enter: return needed; call_return: block recorded
	struct call_out out;
};

const volatile enum test_op_kind unused_test_op_kind = T_ENTER;
const struct test_op *unused_test_op __attribute__((unused));
const struct test_result *unused_test_result __attribute__((unused));
const volatile enum probe_cookie unused_cookie = P_WRAPPER;
const volatile enum probe_kind unused_probe_kind = P_MALLOC;
const volatile enum counter unused_counter = NR_COUNTERS;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct test_op);
} test_ops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct thread_state);
} test_threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct test_result);
} test_results SEC(".maps");

SEC("raw_tp")
int test_call(void *ctx)
{
	__u32 zero = 0;
	struct test_op *op = bpf_map_lookup_elem(&test_ops, &zero);
	struct thread_state *ts = bpf_map_lookup_elem(&test_threads, &zero);
	struct test_result *res = bpf_map_lookup_elem(&test_results, &zero);
	if (!op || !ts || !res)
		return 1;
	struct call_in in = op->in;
	struct call_out out = {};
	res->ret = 0;
	res->out = out;
	switch (op->op) {
	case T_ENTER:
		res->ret = call_enter(ts, &in, in.cookie & P_KIND_MASK);
		break;
	case T_RETURN:
		res->ret = call_return(ts, &in, &out);
		res->out = out;
		if (res->ret) {
			struct live_key k = {.tgid = in.tgid, .addr = out.ptr};
			struct live_block b = {.size = out.size, .stack_id = TEST_STACK_ID};
			bpf_map_update_elem(&live, &k, &b, BPF_ANY);
		}
		break;
	case T_TAIL:
		call_tail(ts, &in);
		break;
	default:
		return 1;
	}
	return 0;
}
