//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// Runs the RSS tier's decision logic (rss.h) on explicit inputs under
// BPF_PROG_RUN, for the Go table test in internal/rss.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "rss.h"

char LICENSE[] SEC("license") = "GPL";

SEC("syscall")
int rss_test_decide(struct rss_test_ctx *ctx)
{
	// As on_fault in rss.bpf.c: the cached verdict, else the maps.
	if (rss_verdict_fresh(&ctx->v, ctx->gen, ctx->css)) {
		ctx->is_target = ctx->v.target;
		ctx->verdict_hit = 1;
	} else {
		ctx->is_target = rss_is_target(ctx->tgid, ctx->memcg, ctx->cgroup);
		ctx->verdict_hit = 0;
		ctx->v.gen = ctx->gen;
		ctx->v.css = ctx->css;
		ctx->v.target = ctx->is_target;
	}
	__s64 cd = ctx->countdown;
	ctx->sampled = rss_sampled(&cd, ctx->size, ctx->gap);
	ctx->countdown = cd;
	ctx->thp =
	    rss_thp_expected(ctx->thp_mode, ctx->vm_flags, ctx->vm_start, ctx->vm_end, ctx->addr);
	return 0;
}
