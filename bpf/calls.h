// SPDX-License-Identifier: GPL-2.0
//
// The allocator-call decision logic: sampling, the pending call of a thread
// (nested, tail-called and abandoned calls), each kind's entry and return,
// untracking. Everything a probe reads from registers or the user stack
// comes in as explicit arguments, so that the production programs
// (memprof.bpf.c) and the test programs (calls_test.bpf.c, run from Go with
// BPF_PROG_RUN) share this code and the maps it uses.
#ifndef MEMPROF_CALLS_H
#define MEMPROF_CALLS_H

#include <bpf/bpf_core_read.h>

#include "memprof.h"

// Set by the loader before load.
const volatile __u32 sample_all = 0; // 1: every allocation is sampled (--sample-rate 1)

// Exponential gaps (bytes) between samples, filled by userspace with
// quantiles of Exp(mean = rate); one is picked at random after each sample.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GAP_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u64);
} gaps SEC(".maps");

// Sampled blocks that are still live.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LIVE);
	__type(key, struct live_key);
	__type(value, struct live_block);
} live SEC(".maps");

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

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		(*c)++;
}

// One probe hit as the logic sees it.
struct call_in {
	__u64 cookie;	  // enum cookie: kind, flags, site, probe offset, function size
	__u64 ip;	  // the probed instruction's address
	__u64 sp;	  // stack pointer at the probe (at a return probe: the one at entry)
	__u64 a1, a2, a3; // argument registers at entry; a1 is rax at a return
	__u64 bp;	  // rbp at the probe
	__u64 tramp; // the process's uretprobe trampoline address; 0: read it from the current task
	__u32 tgid;
};

// What a return asks the caller to record: the block and its size, and
// for an allocation forwarded by a P_FORWARD function the registers its
// stack is taken from (those of the forwarding function's return).
struct call_out {
	__u64 ptr;
	__u64 size;
	__u64 ip, sp, bp; // valid when fwd is set
	__u32 fwd;
	__u32 _pad;
};

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

// flush_calls adds the thread's pending call count to its process's.
static __always_inline void flush_calls(struct thread_state *ts, __u32 tgid)
{
	__u64 n = ts->calls;
	ts->calls = 0;
	__u64 *c = bpf_map_lookup_elem(&proc_calls, &tgid);
	if (c) {
		__sync_fetch_and_add(c, n);
		return;
	}
	bpf_map_update_elem(&proc_calls, &tgid, &n, BPF_NOEXIST);
}

static __always_inline void count_call(struct thread_state *ts, __u32 tgid)
{
	if (++ts->calls >= CALLS_FLUSH)
		flush_calls(ts, tgid);
}

static __always_inline int read_user_u64(__u64 addr, __u64 *v)
{
	return bpf_probe_read_user(v, sizeof(*v), (void *)addr);
}

// fn_of returns the code range of the function a probe is in.
static __always_inline struct fn_range fn_of(const struct call_in *in)
{
	__u64 off = (in->cookie >> COOKIE_OFF_SHIFT) & 0xffff;
	__u64 size = in->cookie >> COOKIE_SIZE_SHIFT;
	struct fn_range r = {.lo = in->ip - off, .hi = in->ip - off + size};
	return r;
}

static __always_inline void add_fn(struct pending *p, struct fn_range r)
{
	__u32 n = p->nfns;
	if (n < MAX_CALL_FNS) {
		p->fns[n] = r;
		p->nfns = n + 1;
	}
}

static __always_inline int in_fns(struct pending *p, __u64 addr)
{
	for (int i = 0; i < MAX_CALL_FNS; i++) {
		if (i >= p->nfns)
			break;
		if (addr >= p->fns[i].lo && addr < p->fns[i].hi)
			return 1;
	}
	return 0;
}

// abandon drops a pending call whose frame is gone without its return
// having been seen (longjmp or an exception out of the allocator, a lost
// probe), and counts it.
static __always_inline void abandon(struct thread_state *ts)
{
	ts->active = 0;
	// A forwarding call whose forwarded allocation was seen failing
	// allocated nothing memprof could miss: it is left by the bad_alloc
	// operator new throws (__cxa_allocate_exception's malloc), or by its
	// new_handler's own calls (new's retry then is a call of its own).
	if (ts->pending.fwd == FWD_FAILED)
		return;
	count(C_MISSED_RETURN);
	// A forwarding call whose allocation was never seen: the function did
	// not call a probed allocator (or threw before it did).
	if (ts->pending.fwd == FWD_OUTER)
		count(C_FORWARD_UNSEEN);
}

// uretprobe_trampoline returns the address of the current process's
// uretprobe trampoline (0 while it has none): the kernel writes it over the
// return address at [sp] when a return probe is armed, after the entry
// program has run (kernel/events/uprobes.c: handler_chain, then
// prepare_uretprobe; uprobe_get_trampoline_vaddr is xol_area->vaddr). The
// test programs give it in in->tramp.
static __always_inline __u64 uretprobe_trampoline(const struct call_in *in)
{
	if (in->tramp)
		return in->tramp;
	struct task_struct *task = bpf_get_current_task_btf();
	return BPF_CORE_READ(task, mm, uprobes_state.xol_area, vaddr);
}

// frame_live reports whether the pending call's frame is still on the
// stack: [sp] holds the return address it had at entry, or the uretprobe
// trampoline that replaced it when the call's return probe was armed.
static __always_inline int frame_live(const struct pending *p, const struct call_in *in)
{
	__u64 v = 0;
	if (read_user_u64(p->sp, &v) != 0)
		return 0;
	if (v == p->ret)
		return 1;
	__u64 tramp = uretprobe_trampoline(in);
	return tramp && v == tramp;
}

// nested reports whether an allocator entry at in->sp runs inside the
// thread's pending call, which then keeps it. The pending call's frame is
// live while the return address it found at entry (or the uretprobe
// trampoline the kernel put in its place) is still at its stack pointer; a
// call nested in it is made from the code of a function the call entered (a
// wrapper's call of malloc, realloc's free) at a lower stack pointer, or
// continues it after a tail jump at the same stack pointer. After a tail
// jump to a function that is not probed (mimalloc's realloc -> jmp
// mi_heap_realloc@plt), whose code memprof does not know the bounds of, any
// call below the live frame is nested in it. Any other entry means the
// pending call was abandoned, whatever the depth: it is dropped and counted,
// and the entry is a call of its own.
static __always_inline int nested(struct thread_state *ts, const struct call_in *in)
{
	if (!ts->active)
		return 0;
	struct pending *p = &ts->pending;
	if (in->sp == p->sp && p->tail) {
		p->tail = 0;
		add_fn(p, fn_of(in));
		return 1;
	}
	if (in->sp < p->sp && frame_live(p, in)) {
		__u64 ret = 0;
		if (read_user_u64(in->sp, &ret) == 0 && (p->tail || in_fns(p, ret))) {
			add_fn(p, fn_of(in));
			return 1;
		}
	}
	abandon(ts);
	return 0;
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

static __always_inline int tracked(__u32 tgid, __u64 ptr)
{
	struct live_key k = {.tgid = tgid, .addr = ptr};
	return bpf_map_lookup_elem(&live, &k) != 0;
}

static __always_inline void untrack(__u32 tgid, __u64 ptr)
{
	struct live_key k = {.tgid = tgid, .addr = ptr};
	// Most frees are of blocks that were not sampled: a lock-free lookup
	// first, the delete (which takes the bucket lock) only on a hit.
	if (bpf_map_lookup_elem(&live, &k))
		bpf_map_delete_elem(&live, &k);
}

// forward hands a P_FORWARD call (libstdc++'s operator new) over to the
// allocating call nested in it that it forwards to (malloc, aligned_alloc,
// or an operator new of another library that is not itself P_FORWARD):
// that call becomes the pending one, with the forwarding call's size,
// sampling decision and entry registers, and its return records the block
// with the stack the forwarding function's return would have had. The
// forwarding function itself then needs no return probe and no probes on
// its ret instructions (each a single-stepped trap on every call). An
// unsampled call ends here unless the callee must stay pending (it is a
// wrapper or returns at its ret instructions). It returns whether the
// nested call's return must be seen. A failed allocation hands the call
// back (see call_return): operator new's new_handler loop calls malloc
// again. The block is recorded with the size the nested call asks for: an
// operator new of a target's own libstdc++ may ask malloc for a size of its
// own (a header, new(0) -> malloc(1)) or call it for something else first;
// when the size differs the sampling decision is drawn again for it.
static __always_inline int forward(struct thread_state *ts, const struct call_in *in, __u8 kind,
				   __u64 size, __u64 ptr)
{
	struct pending *p = &ts->pending;
	if (p->fwd != FWD_OUTER && p->fwd != FWD_FAILED)
		return 0;
	if ((in->cookie & P_FORWARD) || (kind != K_PTR && kind != K_MEMPTR))
		return 0; // operator new (nothrow) -> operator new: still the outer's
	__u64 ret = 0;
	if (read_user_u64(in->sp, &ret) != 0)
		ret = 0;
	p->sp = in->sp;
	p->ret = ret;
	p->kind = kind;
	p->ptr = ptr;
	p->tail = 0;
	p->fwd = FWD_INNER;
	if (size != p->size) {
		p->size = size;
		p->sampled = sampled(ts, size);
	}
	if (!p->sampled && !(in->cookie & (P_WRAPPER | P_RETSITES))) {
		ts->active = 0;
		return 0;
	}
	return 1;
}

// begin records an allocating call. Calls nested inside another allocator
// call of the same thread (reallocarray -> realloc, operator new -> malloc)
// are left to the outermost call, so nothing is counted twice and the outer
// call's pending state is never overwritten (a P_FORWARD outer call hands
// itself over to the allocation it forwards to: see forward).
//
// It returns whether the call's return must be seen: the call is sampled, or
// it resizes a tracked block, or always is set (a wrapper that calls other
// allocator entry points must stay pending so the calls nested in it are
// recognised and their bytes not sampled a second time; functions whose
// return is taken at their ret instructions stay pending too). A session
// uprobe skips the return of the calls that need none.
static __always_inline int begin(struct thread_state *ts, const struct call_in *in, __u8 kind,
				 __u64 size, __u64 ptr, int always)
{
	if (nested(ts, in)) {
		count(C_NESTED);
		return forward(ts, in, kind, size, ptr);
	}
	int smp = kind == K_XALLOCX ? 0 : sampled(ts, size);
	if (!smp && !always) {
		if (!ptr || (kind != K_REALLOC && kind != K_XALLOCX))
			return 0;
		if (!tracked(in->tgid, ptr))
			return 0; // resizes a block that is not tracked
	}
	struct pending *p = &ts->pending;
	__u64 ret = 0;
	if (read_user_u64(in->sp, &ret) != 0)
		ret = 0; // the frame check then fails: nested calls count as abandoning it
	p->sp = in->sp;
	p->ret = ret;
	p->kind = kind;
	p->size = size;
	p->ptr = ptr;
	p->sampled = smp;
	p->tail = 0;
	p->nfns = 0;
	p->fwd = FWD_NONE;
	if (in->cookie & P_FORWARD) {
		p->fwd = FWD_OUTER;
		p->osp = in->sp;
		p->oret = ret;
		p->obp = in->bp;
	}
	add_fn(p, fn_of(in));
	ts->active = 1;
	return 1;
}

// enter_kind handles the entry of an allocator function of the given kind
// (with a constant kind the switch folds away) and returns whether its
// return must be seen (see begin).
static __always_inline int enter_kind(struct thread_state *ts, const struct call_in *in, __u64 kind)
{
	__u64 a1 = in->a1, a2 = in->a2, a3 = in->a3;
	__u64 total;
	int always = (in->cookie & (P_WRAPPER | P_RETSITES | P_FORWARD)) != 0;

	count(kind == P_FREE ? C_FREES : C_CALLS);
	count_call(ts, in->tgid);
	switch (kind) {
	case P_MALLOC: // malloc(size), valloc, pvalloc, mallocx, operator new
		return begin(ts, in, K_PTR, a1, 0, always);
	case P_CALLOC:				   // calloc(n, size)
		if (mul_overflows(a1, a2, &total)) // calloc fails
			total = 0;
		return begin(ts, in, K_PTR, total, 0, always);
	case P_MEMALIGN: // memalign(align, size), aligned_alloc
		return begin(ts, in, K_PTR, a2, 0, always);
	case P_POSIX_MEMALIGN: // posix_memalign(memptr, align, size)
		return begin(ts, in, K_MEMPTR, a3, a1, always);
	case P_REALLOC: // realloc(ptr, size), rallocx
		return begin(ts, in, K_REALLOC, a2, a1, always);
	case P_REALLOCARRAY:			   // reallocarray(ptr, n, size)
		if (mul_overflows(a2, a3, &total)) // fails and keeps the block
			total = ~0ULL;
		return begin(ts, in, K_REALLOC, total, a1, always);
	case P_XALLOCX: // xallocx(ptr, size, extra, flags): resizes in place
		return begin(ts, in, K_XALLOCX, 0, a1, always);
	case P_FREE: // free(ptr), operator delete, dallocx, sdallocx
		if (!a1)
			return 0;
		// A free nested in another allocator call belongs to it.
		if (nested(ts, in)) {
			count(C_NESTED);
			return 0;
		}
		untrack(in->tgid, a1);
		return 0;
	}
	return 0;
}

// call_enter handles the entry of an allocator function and returns whether
// a return probe must see its return: never for a P_RETSITES function,
// whose ret instructions are probed instead, nor for a P_FORWARD one, whose
// block the call it forwards to records.
static __always_inline int call_enter(struct thread_state *ts, const struct call_in *in, __u64 kind)
{
	return enter_kind(ts, in, kind) && !(in->cookie & (P_RETSITES | P_FORWARD));
}

// call_tail handles a jmp from a probed function to another allocator
// function (glibc realloc(NULL, n) -> malloc, reallocarray -> realloc), or
// to a PLT stub (mimalloc's realloc -> mi_heap_realloc, not probed): the
// function's frame is gone and the callee, entered at the same stack
// pointer, returns for it (see nested for a callee that is not probed).
static __always_inline void call_tail(struct thread_state *ts, const struct call_in *in)
{
	if (ts->active && ts->pending.sp == in->sp) {
		ts->pending.tail = 1;
		count(C_TAIL_CALLS);
	}
}

// call_return handles the return of the call whose entry had stack pointer
// in->sp with result in->a1. It returns 1 when out holds a sampled block to
// record.
static __always_inline int call_return(struct thread_state *ts, const struct call_in *in,
				       struct call_out *out)
{
	if (!ts->active)
		return 0;
	struct pending *p = &ts->pending;
	if (in->sp < p->sp)
		return 0; // a nested call, left to the outer one
	if (in->sp > p->sp) {
		abandon(ts); // its frame is gone
		return 0;
	}
	__u64 ret = in->a1;
	__u64 ptr = ret;
	if (p->fwd == FWD_INNER &&
	    ((p->kind == K_PTR && ret == 0) || (p->kind == K_MEMPTR && (int)ret != 0))) {
		// The forwarded allocation failed: the forwarding function
		// (still running) may call its new_handler and try again, or
		// throw. The call is its own again.
		p->sp = p->osp;
		p->ret = p->oret;
		p->kind = K_PTR;
		p->ptr = 0;
		p->fwd = FWD_FAILED;
		return 0;
	}
	ts->active = 0;

	switch (p->kind) {
	case K_MEMPTR:
		// posix_memalign returns 0 and stores the block through memptr.
		if ((int)ret != 0)
			return 0;
		if (read_user_u64(p->ptr, &ptr) != 0) {
			count(C_READ_FAILED);
			return 0;
		}
		break;
	case K_REALLOC:
		if (ret == 0) {
			// realloc(p, 0) frees p and returns NULL; any other NULL
			// is a failure that leaves the old block alone.
			if (p->size == 0 && p->ptr)
				untrack(in->tgid, p->ptr);
			return 0;
		}
		if (p->ptr)
			untrack(in->tgid, p->ptr);
		break;
	case K_XALLOCX: {
		// Resized in place to ret bytes: keep the block's stack, new size.
		struct live_key k = {.tgid = in->tgid, .addr = p->ptr};
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
	flush_calls(ts, in->tgid);
	out->ptr = ptr;
	out->size = p->size;
	if (p->fwd == FWD_INNER) {
		out->fwd = 1;
		out->ip = p->oret;
		out->sp = p->osp + 8;
		out->bp = p->obp;
	}
	return 1;
}

#endif
