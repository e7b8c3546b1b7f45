//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// memprof's BPF side: uprobes on the allocator's entry points and returns
// record a Poisson byte sample of allocations with their user stacks, keep
// the sampled blocks that are still live keyed by (process, address), and the
// oom:mark_victim tracepoint reports OOM kills.
//
// Hot path budget: every malloc and free of a target runs an entry program and
// every allocating call a return program. The fast path of each is one task
// storage lookup and a few arithmetic instructions; map writes and the stack
// walk happen only for sampled allocations (one per ~512 KiB by default).

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "memprof.h"

char LICENSE[] SEC("license") = "GPL";

// Set by the loader before load.
const volatile __u32 sample_all = 0;	// 1: every allocation is sampled (--sample-rate 1)
const volatile __u32 stack_mode = SM_FP;	// enum stack_mode
// Exposes enum counter and enum call_kind to the generated Go types.
const volatile enum counter nr_counters = NR_COUNTERS;
const volatile enum call_kind max_kind = K_XALLOCX;
// Exposes the event layouts to the generated Go types.
const struct oom_event *unused_oom_event __attribute__((unused));
const struct stack_event *unused_stack_event __attribute__((unused));
const volatile enum stack_mode unused_stack_mode = SM_FP;
const volatile enum event_type unused_event_type = EV_OOM;

__u32 stack_seq; // sequence of copied stacks

// Processes whose stacks are copied in SM_AUTO mode (executables built
// without frame pointers), set by userspace.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, __u8);
} dwarf_procs SEC(".maps");

// Exponential gaps (bytes) between samples, filled by userspace with
// quantiles of Exp(mean = rate); one is picked at random after each sample.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GAP_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u64);
} gaps SEC(".maps");

// Per-thread allocator-call state, freed by the kernel with the task.
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct thread_state);
} threads SEC(".maps");

// Sampled blocks that are still live.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LIVE);
	__type(key, struct live_key);
	__type(value, struct live_block);
} live SEC(".maps");

// Sampled allocations during the window per (process, stack, size).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ALLOC_BUCKETS);
	__type(key, struct alloc_key);
	__type(value, __u64);
} allocs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, MAX_STACKS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAX_STACK_DEPTH * sizeof(__u64));
} stacks SEC(".maps");

// Allocator calls per process (probe hits), for rates and the overhead
// budget. Threads add their count here every CALLS_FLUSH calls and at each
// sample, so the hot path only touches its own task storage.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, __u64);
} proc_calls SEC(".maps");

// Counters (probe hits, samples, and every cause of a lost event), per CPU.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

// Events for userspace: OOM kills and raw stack copies.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24); // 16 MiB: ~2000 stack copies in flight
} events SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		(*c)++;
}

static __always_inline __u64 memcg_id(struct task_struct *task)
{
	// The memory controller's cgroup: the v1 memory hierarchy on hybrid
	// hosts, the unified hierarchy on pure cgroup v2 hosts.
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	if (id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return 0;
	return BPF_CORE_READ(task, cgroups, subsys[id], cgroup, kn, id);
}

// mul_overflows computes a*b in 32-bit halves (BPF has no 128-bit multiply).
static __always_inline int mul_overflows(__u64 a, __u64 b, __u64 *out)
{
	if (a < b) {
		__u64 t = a;
		a = b;
		b = t;
	}
	// now b <= a
	if (b >> 32)
		return 1;
	__u64 hi = (a >> 32) * b;
	if (hi >> 32)
		return 1;
	__u64 lo = (a & 0xffffffffULL) * b;
	__u64 total = (hi << 32) + lo;
	if (total < lo)
		return 1;
	*out = total;
	return 0;
}

static __always_inline struct thread_state *thread(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	return bpf_task_storage_get(&threads, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
}

// flush_calls adds the thread's pending call count to its process's.
static __always_inline void flush_calls(struct thread_state *ts)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 n = ts->calls;
	ts->calls = 0;
	__u64 *c = bpf_map_lookup_elem(&proc_calls, &tgid);
	if (c) {
		__sync_fetch_and_add(c, n);
		return;
	}
	bpf_map_update_elem(&proc_calls, &tgid, &n, BPF_NOEXIST);
}

static __always_inline void count_call(struct thread_state *ts)
{
	if (++ts->calls >= CALLS_FLUSH)
		flush_calls(ts);
}

// in_call reports whether the thread is inside a pending allocator call
// at stack pointer sp. A pending call whose frame is already gone (its
// return probe never fired: longjmp out of the allocator, the uretprobe
// depth limit) has its stack pointer below sp: it is dropped and counted.
static __always_inline int in_call(struct thread_state *ts, __u64 sp)
{
	if (!ts->active)
		return 0;
	if (ts->pending.sp < sp) {
		ts->active = 0;
		count(C_MISSED_RETURN);
		return 0;
	}
	return 1;
}

// gap draws the distance in bytes to the next sample.
static __always_inline __s64 gap(void)
{
	__u32 idx = bpf_get_prandom_u32() & (GAP_TABLE_SIZE - 1);
	__u64 *g = bpf_map_lookup_elem(&gaps, &idx);
	return g && *g ? *g : 1;
}

// sampled decides, Poisson by bytes, whether an allocation of size bytes is
// sampled.
static __always_inline int sampled(struct thread_state *ts, __u64 size)
{
	if (sample_all)
		return 1;
	if (ts->countdown == 0) // a new thread: start at a random point
		ts->countdown = gap();
	if (ts->countdown > (__s64)size) {
		ts->countdown -= size;
		return 0;
	}
	ts->countdown = gap();
	return 1;
}

// enter records an allocator call. Calls nested inside another allocator
// call of the same thread (reallocarray -> realloc, an allocator calling its
// own public entry points) are left to the outermost call, so nothing is
// counted twice and the outer call's pending state is never overwritten.
//
// It returns whether the call's return must be seen: the call is sampled,
// or it resizes a tracked block, or always is set (plain uretprobes fire
// anyway; a wrapper that calls other allocator entry points, such as
// libstdc++'s operator new calling malloc, must stay pending so the calls
// nested in it are recognised and their bytes not sampled a second time).
// A session uprobe skips the return of the calls that need none.
static __always_inline int enter(struct pt_regs *ctx, __u8 kind, __u64 size, __u64 ptr, int always)
{
	struct thread_state *ts = thread();
	if (!ts) {
		count(C_NO_THREAD_STATE);
		return 0;
	}
	count_call(ts);
	__u64 sp = PT_REGS_SP(ctx);
	if (in_call(ts, sp)) {
		count(C_NESTED);
		return 0;
	}
	int smp = kind == K_XALLOCX ? 0 : sampled(ts, size);
	if (!smp && !always) {
		if (!ptr || (kind != K_REALLOC && kind != K_XALLOCX))
			return 0;
		struct live_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .addr = ptr};
		if (!bpf_map_lookup_elem(&live, &k))
			return 0; // resizes a block that is not tracked
	}
	struct pending *p = &ts->pending;
	p->sp = sp;
	p->kind = kind;
	p->size = size;
	p->ptr = ptr;
	p->sampled = smp;
	ts->active = 1;
	return 1;
}

static __always_inline void untrack(__u32 tgid, __u64 ptr)
{
	struct live_key k = {.tgid = tgid, .addr = ptr};
	// Most frees are of blocks that were not sampled: a lock-free lookup
	// first, the delete (which takes the bucket lock) only on a hit.
	if (bpf_map_lookup_elem(&live, &k))
		bpf_map_delete_elem(&live, &k);
}

// copy_stack sends the registers and the top of the user stack of a sampled
// allocation to userspace and returns its stack id (STACK_DWARF | seq), or
// -1 when the ring buffer is full.
static __always_inline __s64 copy_stack(struct pt_regs *ctx, __u32 tgid, __u64 size)
{
	struct stack_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(C_EVENTS_LOST);
		return -1;
	}
	__u32 seq = __sync_fetch_and_add(&stack_seq, 1) % (STACK_DWARF - 1);
	e->type = EV_STACK;
	e->tgid = tgid;
	e->seq = seq;
	e->size = size;
	e->ip = PT_REGS_IP(ctx);
	e->sp = PT_REGS_SP(ctx);
	e->bp = PT_REGS_FP(ctx);
	// The main thread's stack may end less than STACK_COPY bytes above sp
	// (its outermost frames sit near the top), and a read that crosses
	// the end fails whole: copy up to mm->start_stack (where argc lies,
	// above every frame) when that is closer. Thread stacks are followed
	// by their thread descriptor in the same mapping. Shorter copies are
	// tried if the read still fails.
	void *sp = (void *)e->sp;
	__u64 n = STACK_COPY;
	__u64 top = BPF_CORE_READ((struct task_struct *)bpf_get_current_task_btf(), mm, start_stack);
	if (top > e->sp && top - e->sp < STACK_COPY)
		n = top - e->sp;
	n &= STACK_COPY * 2 - 1; // bounds for the verifier
	if (n > STACK_COPY)
		n = STACK_COPY;
	e->len = 0;
	if (n > 0 && bpf_probe_read_user(e->data, n, sp) == 0)
		e->len = n;
	else if (bpf_probe_read_user(e->data, STACK_COPY / 4, sp) == 0)
		e->len = STACK_COPY / 4;
	else if (bpf_probe_read_user(e->data, STACK_COPY / 16, sp) == 0)
		e->len = STACK_COPY / 16;
	bpf_ringbuf_submit(e, 0);
	count(C_STACK_COPIES);
	return STACK_DWARF | seq;
}

static __always_inline int wants_copy(__u32 tgid)
{
	if (stack_mode == SM_DWARF)
		return 1;
	if (stack_mode == SM_AUTO)
		return bpf_map_lookup_elem(&dwarf_procs, &tgid) != 0;
	return 0;
}

static __always_inline void track(struct pt_regs *ctx, __u32 tgid, __u64 ptr, __u64 size)
{
	count(C_SAMPLES);
	__s64 sid = -1;
	if (wants_copy(tgid))
		sid = copy_stack(ctx, tgid, size);
	if (sid < 0) {
		sid = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		if (sid < 0) {
			count(sid == -EEXIST ? C_STACK_COLLISION : C_STACK_LOST);
			sid = STACK_UNKNOWN;
		}
	}
	// Copied stacks are counted from their events in userspace.
	if (sid != STACK_UNKNOWN && (sid & STACK_DWARF))
		goto live;
	struct alloc_key ak = {.tgid = tgid, .stack_id = sid, .size = size};
	__u64 *n = bpf_map_lookup_elem(&allocs, &ak);
	if (n) {
		__sync_fetch_and_add(n, 1);
	} else {
		__u64 one = 1;
		if (bpf_map_update_elem(&allocs, &ak, &one, BPF_NOEXIST) != 0) {
			n = bpf_map_lookup_elem(&allocs, &ak);
			if (n)
				__sync_fetch_and_add(n, 1);
			else
				count(C_ALLOCS_FULL);
		}
	}
live:;
	struct task_struct *task = bpf_get_current_task_btf();
	struct live_key k = {.tgid = tgid, .addr = ptr};
	struct live_block b = {
		.size = size,
		.stack_id = sid,
		.memcg = memcg_id(task),
		.cgroup = bpf_get_current_cgroup_id(),
		.ts = bpf_ktime_get_ns(),
	};
	if (bpf_map_update_elem(&live, &k, &b, BPF_ANY) != 0)
		count(C_LIVE_FULL);
}

// ---- entry probes -------------------------------------------------------

// on_enter handles the entry of an allocator function of the given kind
// (enum probe_kind, the same numbering as Go's attach.Kind) and returns
// whether its return must be seen (see enter). With a constant kind the
// switch folds away.
static __always_inline int on_enter(struct pt_regs *ctx, __u64 kind, int always)
{
	__u64 a1 = PT_REGS_PARM1(ctx), a2 = PT_REGS_PARM2(ctx), a3 = PT_REGS_PARM3(ctx);
	__u64 total;

	count(kind == P_FREE ? C_FREES : C_CALLS);
	switch (kind) {
	case P_MALLOC: // malloc(size), valloc, pvalloc, mallocx, operator new
		return enter(ctx, K_PTR, a1, 0, always);
	case P_CALLOC: // calloc(n, size)
		if (mul_overflows(a1, a2, &total)) // calloc fails
			total = 0;
		return enter(ctx, K_PTR, total, 0, always);
	case P_MEMALIGN: // memalign(align, size), aligned_alloc
		return enter(ctx, K_PTR, a2, 0, always);
	case P_POSIX_MEMALIGN: // posix_memalign(memptr, align, size)
		return enter(ctx, K_MEMPTR, a3, a1, always);
	case P_REALLOC: // realloc(ptr, size), rallocx
		return enter(ctx, K_REALLOC, a2, a1, always);
	case P_REALLOCARRAY: // reallocarray(ptr, n, size)
		if (mul_overflows(a2, a3, &total)) // fails and keeps the block
			total = ~0ULL;
		return enter(ctx, K_REALLOC, total, a1, always);
	case P_XALLOCX: // xallocx(ptr, size, extra, flags): resizes in place
		return enter(ctx, K_XALLOCX, 0, a1, always);
	case P_FREE: { // free(ptr), operator delete, dallocx, sdallocx
		if (!a1)
			return 0;
		struct thread_state *ts = thread();
		if (ts) {
			count_call(ts);
			// A free nested in another allocator call belongs to it.
			if (in_call(ts, PT_REGS_SP(ctx))) {
				count(C_NESTED);
				return 0;
			}
		}
		untrack(bpf_get_current_pid_tgid() >> 32, a1);
		break;
	}
	}
	return 0;
}

// One program per kind for per-probe (perf event) attachment...
SEC("uprobe")
int malloc_enter(struct pt_regs *ctx) { on_enter(ctx, P_MALLOC, 1); return 0; }
SEC("uprobe")
int calloc_enter(struct pt_regs *ctx) { on_enter(ctx, P_CALLOC, 1); return 0; }
SEC("uprobe")
int memalign_enter(struct pt_regs *ctx) { on_enter(ctx, P_MEMALIGN, 1); return 0; }
SEC("uprobe")
int posix_memalign_enter(struct pt_regs *ctx) { on_enter(ctx, P_POSIX_MEMALIGN, 1); return 0; }
SEC("uprobe")
int realloc_enter(struct pt_regs *ctx) { on_enter(ctx, P_REALLOC, 1); return 0; }
SEC("uprobe")
int reallocarray_enter(struct pt_regs *ctx) { on_enter(ctx, P_REALLOCARRAY, 1); return 0; }
SEC("uprobe")
int xallocx_enter(struct pt_regs *ctx) { on_enter(ctx, P_XALLOCX, 1); return 0; }
SEC("uprobe")
int free_enter(struct pt_regs *ctx) { on_enter(ctx, P_FREE, 1); return 0; }

// ...and one for uprobe_multi links (6.6+), where each probe's cookie is
// its kind: a process's probes in one object are one link, attached and
// detached with one kernel synchronization instead of one per probe.
SEC("uprobe.multi")
int enter_multi(struct pt_regs *ctx) { on_enter(ctx, bpf_get_attach_cookie(ctx), 1); return 0; }

// ---- return probe -------------------------------------------------------

static __always_inline int on_return(struct pt_regs *ctx, __u64 ret)
{
	struct thread_state *ts = thread();
	if (!ts)
		return 0;
	// At return the stack pointer is one slot above the one at entry.
	__u64 sp = PT_REGS_SP(ctx) - 8;
	if (!in_call(ts, sp))
		return 0;
	struct pending *p = &ts->pending;
	if (p->sp != sp)
		return 0; // a nested call, left to the outer one
	ts->active = 0;

	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 ptr = ret;
	switch (p->kind) {
	case K_MEMPTR:
		// posix_memalign returns 0 and stores the block through memptr.
		if ((int)ret != 0)
			return 0;
		if (bpf_probe_read_user(&ptr, sizeof(ptr), (void *)p->ptr) != 0) {
			count(C_READ_FAILED);
			return 0;
		}
		break;
	case K_REALLOC:
		if (ret == 0) {
			// realloc(p, 0) frees p and returns NULL; any other NULL
			// is a failure that leaves the old block alone.
			if (p->size == 0 && p->ptr)
				untrack(tgid, p->ptr);
			return 0;
		}
		if (p->ptr)
			untrack(tgid, p->ptr);
		break;
	case K_XALLOCX: {
		// Resized in place to ret bytes: keep the block's stack, new size.
		struct live_key k = {.tgid = tgid, .addr = p->ptr};
		struct live_block *b = bpf_map_lookup_elem(&live, &k);
		if (b)
			b->size = ret;
		return 0;
	}
	default:
		break;
	}
	if (ptr == 0 || !p->sampled)
		return 0;
	flush_calls(ts);
	track(ctx, tgid, ptr, p->size);
	return 0;
}

SEC("uretprobe")
int alloc_return(struct pt_regs *ctx) { return on_return(ctx, PT_REGS_RC(ctx)); }

SEC("uretprobe.multi")
int return_multi(struct pt_regs *ctx) { return on_return(ctx, PT_REGS_RC(ctx)); }

extern bool bpf_session_is_return(void) __ksym __weak;

// ...and one session program for entry and return on 6.13+: the return
// probe runs only for the calls whose entry asks for it (returns 0), so an
// unsampled malloc pays one trap instead of two. The cookie carries the kind
// and P_WRAPPER for functions that call other allocator entry points.
SEC("uprobe.session")
int alloc_session(struct pt_regs *ctx)
{
	if (bpf_session_is_return())
		return on_return(ctx, PT_REGS_RC(ctx));
	__u64 c = bpf_get_attach_cookie(ctx);
	return on_enter(ctx, c & P_KIND_MASK, c & P_WRAPPER) ? 0 : 1;
}

// ---- OOM kills ----------------------------------------------------------

// oom_event_start reserves an OOM event for victim pid (NULL, counted, when
// the ring buffer is full).
static __always_inline struct oom_event *oom_event_start(__u32 pid)
{
	struct oom_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(C_EVENTS_LOST);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->type = EV_OOM;
	e->pid = pid;
	e->ts = bpf_ktime_get_ns();
	return e;
}

// oom_event_send adds the task running here, the one whose allocation hit
// the limit (its memory cgroup is where the OOM happened), and sends e.
static __always_inline void oom_event_send(struct oom_event *e)
{
	e->trigger_memcg = memcg_id(bpf_get_current_task_btf());
	e->trigger_pid = bpf_get_current_pid_tgid() >> 32;
	bpf_ringbuf_submit(e, 0);
}

// Where the tracepoint passes the victim's task (6.8+, tp_btf needs no
// tracefs): everything is read from the task itself.
SEC("tp_btf/mark_victim")
int BPF_PROG(oom_mark_victim_btf, struct task_struct *task)
{
	struct oom_event *e = oom_event_start(BPF_CORE_READ(task, tgid));
	if (!e)
		return 0;
	e->memcg = memcg_id(task);
	e->cgroup = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	e->oom_score_adj = BPF_CORE_READ(task, signal, oom_score_adj);
	e->have_score = 1;
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (mm) {
		// The counters' global part: per-CPU deltas not yet folded in
		// (a few hundred KiB at most) are missed. Pages -> KiB.
		e->anon_rss = BPF_CORE_READ(mm, rss_stat[MM_ANONPAGES].count) * 4;
		e->file_rss = BPF_CORE_READ(mm, rss_stat[MM_FILEPAGES].count) * 4;
		e->shmem_rss = BPF_CORE_READ(mm, rss_stat[MM_SHMEMPAGES].count) * 4;
		e->total_vm = BPF_CORE_READ(mm, total_vm);
		e->have_rss = 1;
	}
	oom_event_send(e);
	return 0;
}

// The classic tracepoint, for kernels whose mark_victim passes only the pid:
// fields beyond pid are read only where this kernel's BTF has them, the
// victim's cgroups come from /proc in userspace.
SEC("tracepoint/oom/mark_victim")
int oom_mark_victim(struct trace_event_raw_mark_victim *tp)
{
	struct oom_event *e = oom_event_start(BPF_CORE_READ(tp, pid));
	if (!e)
		return 0;
	if (bpf_core_field_exists(tp->anon_rss)) {
		e->total_vm = BPF_CORE_READ(tp, total_vm);
		e->anon_rss = BPF_CORE_READ(tp, anon_rss);
		e->file_rss = BPF_CORE_READ(tp, file_rss);
		e->shmem_rss = BPF_CORE_READ(tp, shmem_rss);
		e->have_rss = 1;
	}
	if (bpf_core_field_exists(tp->oom_score_adj)) {
		e->oom_score_adj = BPF_CORE_READ(tp, oom_score_adj);
		e->have_score = 1;
	}
	oom_event_send(e);
	return 0;
}

// ---- empty probes -------------------------------------------------------

// Attached by `make bench` at the same sites as the real programs: they
// measure the floor every uprobe pays (the trap), against which memprof's own
// cost is judged.
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
