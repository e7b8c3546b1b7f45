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

#include "calls.h"
#include "unwind.h"

char LICENSE[] SEC("license") = "GPL";

// Set by the loader before load.
const volatile __u32 stack_mode = SM_FP; // enum stack_mode
// Exposes enum counter and enum call_kind to the generated Go types.
const volatile enum counter nr_counters = NR_COUNTERS;
const volatile enum call_kind max_kind = K_XALLOCX;
const volatile enum bounds unused_bounds = GAP_TABLE_SIZE;
const volatile enum stack_id_flag unused_stack_id_flag = STACK_RET;
const volatile enum probe_cookie unused_cookie = P_WRAPPER;
const volatile enum probe_kind unused_probe_kind = P_MALLOC;
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

// Per-thread allocator-call state, freed by the kernel with the task.
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct thread_state);
} threads SEC(".maps");

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

// Events for userspace: OOM kills and raw stack copies.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 24); // 16 MiB: ~2000 stack copies in flight
} events SEC(".maps");

static __always_inline __u64 memcg_id(struct task_struct *task)
{
	// The memory controller's cgroup: the v1 memory hierarchy on hybrid
	// hosts, the unified hierarchy on pure cgroup v2 hosts.
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	if (id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return 0;
	return BPF_CORE_READ(task, cgroups, subsys[id], cgroup, kn, id);
}

static __always_inline struct thread_state *thread(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	return bpf_task_storage_get(&threads, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
}

// Stacks taken at return instructions, by key STACK_RET | hash: the
// frame-pointer walk's stack id and the caller's address (see struct
// ret_stack).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_RET_STACKS);
	__type(key, __u32);
	__type(value, struct ret_stack);
} ret_stacks SEC(".maps");

// copy_stack sends the registers and the top of the user stack of a sampled
// allocation to userspace and returns its stack id (STACK_DWARF | seq), or
// -1 when the ring buffer is full. ip, sp and bp are the registers as they
// are just after the allocator returned.
static __always_inline __s64 copy_stack(__u64 ip, __u64 sp, __u64 bp, __u32 tgid, __u64 size)
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
	e->ip = ip;
	e->sp = sp;
	e->bp = bp;
	// The main thread's stack may end less than STACK_COPY bytes above sp
	// (its outermost frames sit near the top), and a read that crosses
	// the end fails whole: copy up to mm->start_stack (where argc lies,
	// above every frame) when that is closer. Thread stacks are followed
	// by their thread descriptor in the same mapping. Shorter copies are
	// tried if the read still fails.
	void *usp = (void *)sp;
	__u64 n = STACK_COPY;
	__u64 top =
	    BPF_CORE_READ((struct task_struct *)bpf_get_current_task_btf(), mm, start_stack);
	if (top > sp && top - sp < STACK_COPY)
		n = top - sp;
	n &= STACK_COPY * 2 - 1; // bounds for the verifier
	if (n > STACK_COPY)
		n = STACK_COPY;
	e->len = 0;
	if (n > 0 && bpf_probe_read_user(e->data, n, usp) == 0)
		e->len = n;
	else if (bpf_probe_read_user(e->data, STACK_COPY / 4, usp) == 0)
		e->len = STACK_COPY / 4;
	else if (bpf_probe_read_user(e->data, STACK_COPY / 16, usp) == 0)
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

// ret_stack_id turns the frame-pointer stack taken at a ret instruction
// into a ret_stacks key whose stack has the caller in place of the
// allocator's frame; sid itself when that fails (counted). For a forwarded
// allocation (o->fwd) the stack was taken inside the forwarding function,
// whose caller's frame the walk misses in the same way (the forwarding
// function keeps rbp: internal/attach checks it), and the caller is the
// forwarding function's return address.
static __always_inline __s64 ret_stack_id(struct pt_regs *ctx, __s64 sid, const struct call_out *o)
{
	struct ret_stack rs = {.stack_id = sid};
	if (o->fwd) {
		rs.caller = o->ip;
	} else if (read_user_u64(PT_REGS_SP(ctx), &rs.caller) != 0) {
		count(C_READ_FAILED);
		return sid;
	}
	__u64 h = (rs.caller ^ (rs.caller >> 29) ^ ((__u64)sid * 0x9e3779b97f4a7c15ULL)) *
		  0xff51afd7ed558ccdULL;
	__u32 id = STACK_RET | ((h >> 33) & (STACK_RET - 1));
	if (bpf_map_update_elem(&ret_stacks, &id, &rs, BPF_NOEXIST) == 0)
		return id;
	struct ret_stack *old = bpf_map_lookup_elem(&ret_stacks, &id);
	if (old && old->stack_id == rs.stack_id && old->caller == rs.caller)
		return id;
	count(old ? C_STACK_COLLISION : C_STACK_LOST);
	return sid;
}

// cfi_stack_id walks the user stack with the objects' CFI tables
// (unwind.h) and returns its key in uw_stacks (>= 2^32), or STACK_UNKNOWN
// when the walk could not run or its stack could not be stored (counted in
// uw_stats, uw_intern_stats or C_STACK_COLLISION). A walk that stopped at
// code userspace has not described yet (a mapping not listed: a command's
// libraries just mapped, dlopen; a table still being built) falls back to
// copying the stack for userspace unwinding (STACK_DWARF | seq), which
// happens after the mappings are refreshed; if the ring buffer is full the
// truncated walk is stored, marked. Other truncated walks are stored with
// their status: userspace marks them.
static __always_inline __u64 cfi_stack_id(struct pt_regs *ctx, __u32 tgid, __u64 size, int at_ret,
					  const struct call_out *o)
{
	__u64 ip = PT_REGS_IP(ctx), sp = PT_REGS_SP(ctx), bp = PT_REGS_FP(ctx), ret;
	if (o->fwd) {
		// The forwarding function's return, as a return probe on it
		// would see it.
		ip = o->ip;
		sp = o->sp;
		bp = o->bp;
	} else if (at_ret && read_user_u64(sp, &ret) == 0) {
		// The registers as they are once ret has run, as a return probe
		// sees them: the caller's pc (exact) and sp above the return
		// address (rbp is restored before ret). If [sp] cannot be read the
		// walk starts at the ret itself, whose CFI row says the same.
		ip = ret;
		sp += 8;
	}
	struct uw_state *w = uw_walk(tgid, ip, sp, bp);
	if (!w)
		return STACK_UNKNOWN;
	__u32 status = w->stack.status;
	if (status == UW_TRUNC_NO_MAPPING || status == UW_TRUNC_PENDING) {
		uw_release(w);
		__s64 sid = copy_stack(ip, sp, bp, tgid, size);
		if (sid >= 0)
			return sid;
		w = uw_walk(tgid, ip, sp, bp);
		if (!w)
			return STACK_UNKNOWN;
	}
	__u64 id = uw_intern(w);
	uw_release(w);
	if (id == 0)
		return STACK_UNKNOWN;
	if ((id >> 32) == 0) {
		// Keys below 2^32 are the other modes' ids (copied stacks):
		// a 2^-32 chance per stack, counted.
		count(C_STACK_COLLISION);
		return STACK_UNKNOWN;
	}
	return id;
}

// fp_stack_id takes the stack of the SM_FP, SM_DWARF and SM_AUTO modes:
// a copy for userspace unwinding (STACK_DWARF | seq) or the frame-pointer
// walk's id (STACK_RET | hash at a ret instruction or inside a forwarding
// function).
static __always_inline __u64 fp_stack_id(struct pt_regs *ctx, __u32 tgid, __u64 size, int at_ret,
					 const struct call_out *o)
{
	__s64 sid = -1;
	if (wants_copy(tgid)) {
		__u64 ip = PT_REGS_IP(ctx), sp = PT_REGS_SP(ctx), bp = PT_REGS_FP(ctx);
		if (o->fwd) {
			ip = o->ip;
			sp = o->sp;
			bp = o->bp;
		} else if (at_ret) {
			// Registers as they are once ret has run.
			if (read_user_u64(sp, &ip) != 0)
				ip = 0;
			sp += 8;
		}
		sid = copy_stack(ip, sp, bp, tgid, size);
	}
	if (sid < 0) {
		sid = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		if (sid < 0) {
			count(sid == -EEXIST ? C_STACK_COLLISION : C_STACK_LOST);
			return STACK_UNKNOWN;
		}
		if (at_ret || o->fwd)
			sid = ret_stack_id(ctx, sid, o);
	}
	return (__u64)sid;
}

// track records a sampled block. at_ret: the probe is on the allocator's
// ret instruction ([sp] holds the return address), else just after the
// return (a return probe); o->fwd: the stack is that of the forwarding
// function's return (o->ip, o->sp, o->bp), whatever the probe.
static __always_inline void track(struct pt_regs *ctx, __u32 tgid, const struct call_out *o,
				  int at_ret)
{
	__u64 ptr = o->ptr, size = o->size;
	count(C_SAMPLES);
	__u64 sid;
	if (stack_mode == SM_CFI)
		sid = cfi_stack_id(ctx, tgid, size, at_ret, o);
	else
		sid = fp_stack_id(ctx, tgid, size, at_ret, o);
	// Copied stacks are counted from their events in userspace.
	if (sid != STACK_UNKNOWN && sid < (1ULL << 32) && (sid & STACK_DWARF))
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

// ---- probes ---------------------------------------------------------------

static __always_inline struct call_in call_in(struct pt_regs *ctx, __u64 cookie, __u64 sp)
{
	struct call_in in = {
	    .cookie = cookie,
	    .ip = PT_REGS_IP(ctx),
	    .sp = sp,
	    .a1 = PT_REGS_PARM1(ctx),
	    .a2 = PT_REGS_PARM2(ctx),
	    .a3 = PT_REGS_PARM3(ctx),
	    .bp = PT_REGS_FP(ctx),
	    .tgid = bpf_get_current_pid_tgid() >> 32,
	};
	return in;
}

// on_enter handles an allocator function's entry and returns whether its
// return must be seen by a return probe (see begin in calls.h).
static __always_inline int on_enter(struct pt_regs *ctx, __u64 kind, __u64 cookie)
{
	struct thread_state *ts = thread();
	if (!ts) {
		count(kind == P_FREE ? C_FREES : C_CALLS);
		count(C_NO_THREAD_STATE);
		return 0;
	}
	struct call_in in = call_in(ctx, cookie, PT_REGS_SP(ctx));
	return call_enter(ts, &in, kind);
}

// on_return handles a return: sp is the stack pointer the call had at
// entry; at_ret tells a probe on a ret instruction from a return probe.
static __always_inline int on_return(struct pt_regs *ctx, __u64 sp, int at_ret)
{
	struct thread_state *ts = thread();
	if (!ts)
		return 0;
	struct call_in in = call_in(ctx, 0, sp);
	in.a1 = PT_REGS_RC(ctx);
	struct call_out out = {};
	if (call_return(ts, &in, &out))
		track(ctx, in.tgid, &out, at_ret);
	return 0;
}

static __always_inline void on_tail(struct pt_regs *ctx)
{
	struct thread_state *ts = thread();
	if (!ts)
		return;
	struct call_in in = call_in(ctx, 0, PT_REGS_SP(ctx));
	call_tail(ts, &in);
}

// on_site dispatches a probe by its cookie's site type.
static __always_inline int on_site(struct pt_regs *ctx, __u64 cookie)
{
	switch (cookie & SITE_MASK) {
	case SITE_RET:
		// At the ret instruction sp still points at the return address.
		return on_return(ctx, PT_REGS_SP(ctx), 1);
	case SITE_TAIL:
		on_tail(ctx);
		return 0;
	}
	return on_enter(ctx, cookie & P_KIND_MASK, cookie);
}

// One program per kind for per-probe (perf event) attachment; the cookie
// carries the flags, the probe offset and the function size...
#define ENTER_PROG(name, kind)                                                                     \
	SEC("uprobe") int name(struct pt_regs *ctx)                                                \
	{                                                                                          \
		on_enter(ctx, kind, bpf_get_attach_cookie(ctx));                                   \
		return 0;                                                                          \
	}
ENTER_PROG(malloc_enter, P_MALLOC)
ENTER_PROG(calloc_enter, P_CALLOC)
ENTER_PROG(memalign_enter, P_MEMALIGN)
ENTER_PROG(posix_memalign_enter, P_POSIX_MEMALIGN)
ENTER_PROG(realloc_enter, P_REALLOC)
ENTER_PROG(reallocarray_enter, P_REALLOCARRAY)
ENTER_PROG(xallocx_enter, P_XALLOCX)
ENTER_PROG(free_enter, P_FREE)

SEC("uprobe")
int ret_site(struct pt_regs *ctx)
{
	return on_return(ctx, PT_REGS_SP(ctx), 1);
}

SEC("uprobe")
int tail_site(struct pt_regs *ctx)
{
	on_tail(ctx);
	return 0;
}

// ...and one for uprobe_multi links (6.6+), where each probe's cookie says
// what it is: a process's probes in one object are one link, attached and
// detached with one kernel synchronization instead of one per probe.
SEC("uprobe.multi")
int enter_multi(struct pt_regs *ctx)
{
	on_site(ctx, bpf_get_attach_cookie(ctx));
	return 0;
}

// Return probes, for the functions whose return is not taken at their ret
// instructions: just after the return, the stack pointer is one slot above
// the one at entry.
SEC("uretprobe")
int alloc_return(struct pt_regs *ctx)
{
	return on_return(ctx, PT_REGS_SP(ctx) - 8, 0);
}

SEC("uretprobe.multi")
int return_multi(struct pt_regs *ctx)
{
	return on_return(ctx, PT_REGS_SP(ctx) - 8, 0);
}

extern bool bpf_session_is_return(void) __ksym __weak;

// ...and one session program for all probes on 6.13+: the return probe runs
// only for the entries that ask for it (return 0), so an unsampled malloc
// pays one trap instead of two. ret and tail sites never ask.
SEC("uprobe.session")
int alloc_session(struct pt_regs *ctx)
{
	if (bpf_session_is_return())
		return on_return(ctx, PT_REGS_SP(ctx) - 8, 0);
	__u64 c = bpf_get_attach_cookie(ctx);
	if ((c & SITE_MASK) != SITE_ENTRY) {
		on_site(ctx, c);
		return 1;
	}
	return on_enter(ctx, c & P_KIND_MASK, c) ? 0 : 1;
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
