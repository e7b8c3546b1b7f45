//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// The RSS tier: which stacks made a process's anonymous memory resident.
//
// Anonymous memory becomes resident through a page fault (on untouched
// memory, on the shared zero page, or a copy-on-write of a file page), in
// the thread and at the user stack that touched it. exceptions:page_fault_user
// (and page_fault_kernel, for faults the kernel takes on the process's
// behalf, such as read(2) into a fresh buffer) notes the fault of a target
// thread; kmem:rss_stat, which fires on every change of an mm's RSS counters
// (6.2+), confirms that the fault added an anonymous page. Only then is the
// fault counted and, Poisson over bytes, sampled: failed faults, faults on
// file or shared pages and copy-on-write of an anonymous page shared after
// fork (RssAnon does not change) are not. (An fentry program on
// folio_add_new_anon_rmap would give the folio's size directly, but fentry
// needs the function tracer, which kernels such as this project's are built
// without.)
//
// Sampled folios are kept by (process, address); userspace checks them
// against /proc/PID/pagemap when it takes a profile, so memory given back in
// any way (munmap, MADV_DONTNEED/FREE, brk shrink, swap-out, exit) leaves
// the profile without hooking any system call.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "rss.h"
#include "unwind.h"

char LICENSE[] SEC("license") = "GPL";

// enum rss_stack_mode, set by the loader.
const volatile __u32 rss_stack_mode = RSM_CFI;
// Exposes enums and event layouts to the generated Go types.
const volatile enum rss_counter rss_nr_counters = NR_RSS_COUNTERS;
const volatile enum rss_target_flag rss_unused_flag = RT_TARGET;
const volatile enum rss_thp_mode rss_unused_thp = THP_NEVER;
const volatile enum rss_event_type rss_unused_event = RE_OOM;
const volatile enum rss_stack_mode rss_unused_stack_mode = RSM_FP;
const struct rss_oom_event *rss_unused_oom_event __attribute__((unused));

// Per CPU: bytes to the next sample (a Poisson process over bytes stays one
// when its stream is split among CPUs) and the counters.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rss_cpu);
} rss_percpu SEC(".maps");

// Sampled folios that were resident when faulted in, by (process, address).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RSS_MAX_PAGES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rss_page_key);
	__type(value, struct rss_page);
} rss_pages SEC(".maps");

// Sampled faults per (process, stack, folio size).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RSS_MAX_FAULT_BUCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rss_fault_key);
	__type(value, __u64);
} rss_faults SEC(".maps");

// Frame-pointer stacks (RSM_FP; one entry otherwise, set by the loader).
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, RSS_MAX_STACKS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, RSS_STACK_DEPTH * sizeof(__u64));
} rss_stacks SEC(".maps");

// OOM kills for userspace (stacks are walked in BPF, never copied). An
// event takes 56 bytes with its header: 256 KiB hold ~4,600 kills not read
// yet, where a node sees a few a second at worst and the reader takes each
// at once; a kill that still does not fit is counted (RC_EVENTS_LOST).
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 << 10);
} rss_events SEC(".maps");

static __always_inline struct rss_cpu *rss_this_cpu(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&rss_percpu, &zero);
}

static __always_inline void rss_count(enum rss_counter idx, __u64 n)
{
	struct rss_cpu *c = rss_this_cpu();
	if (c && idx < NR_RSS_COUNTERS)
		c->counters[idx] += n;
}

// rss_memcg is the kernfs id of the task's memory controller cgroup: the v1
// memory hierarchy on hybrid hosts, the unified one on cgroup v2 hosts.
// task must be a trusted BTF pointer (bpf_get_current_task_btf, a tp_btf
// argument): the chain is then plain loads the verifier guards against
// faults (no bpf_probe_read_kernel call per link), under the RCU read lock
// every tracing program holds.
static __always_inline __u64 rss_memcg(struct task_struct *task)
{
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	if (id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return 0;
	struct cgroup_subsys_state *css = task->cgroups->subsys[id];
	if (!css)
		return 0;
	return css->cgroup->kn->id;
}

// rss_stack returns the stack id of a sampled fault of the current task
// (tgid): its user registers (the fault's, or those of the system call
// whose kernel access faulted) walked with the objects' CFI tables
// (unwind.h; frame pointers where an object has none) or by frame pointers
// alone. A CFI walk that cannot complete (an object whose table is not
// built yet, code mapped since userspace last listed the mappings, an
// unreadable frame) is stored with its status: userspace ends its stack
// with a [truncated] frame and counts it. RSS_STACK_UNKNOWN when no stack
// could be stored (counted).
static __always_inline __u64 rss_stack(void *ctx, struct task_struct *task, __u32 tgid)
{
	if (rss_stack_mode == RSM_CFI) {
		struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
		struct uw_state *w = uw_walk(tgid, BPF_CORE_READ(regs, ip), BPF_CORE_READ(regs, sp),
					     BPF_CORE_READ(regs, bp));
		if (!w) { // no free walk state on this CPU (counted as UW_BUSY too)
			rss_count(RC_STACK_LOST, 1);
			return RSS_STACK_UNKNOWN;
		}
		__u64 id = uw_intern(w);
		uw_release(w);
		if (id == 0 || id == RSS_STACK_UNKNOWN) {
			// uw_stacks full, or both slots of its hash taken by other
			// stacks (uw_intern_stats tells which)
			rss_count(RC_STACK_COLLISION, 1);
			return RSS_STACK_UNKNOWN;
		}
		return id;
	}
	long sid = bpf_get_stackid(ctx, &rss_stacks, BPF_F_USER_STACK);
	if (sid < 0) {
		rss_count(sid == -17 /* EEXIST */ ? RC_STACK_COLLISION : RC_STACK_LOST, 1);
		return RSS_STACK_UNKNOWN;
	}
	return (__u64)sid;
}

static __always_inline void record(void *ctx, struct task_struct *task, __u32 tgid, __u64 addr,
				   __u64 size, __u64 memcg, __u64 cgroup)
{
	rss_count(RC_SAMPLES, 1);
	__u64 sid = rss_stack(ctx, task, tgid);
	struct rss_fault_key fk = {.tgid = tgid, .stack_id = sid, .size = size};
	__u64 *n = bpf_map_lookup_elem(&rss_faults, &fk);
	if (n) {
		__sync_fetch_and_add(n, 1);
	} else {
		__u64 one = 1;
		if (bpf_map_update_elem(&rss_faults, &fk, &one, BPF_NOEXIST) != 0) {
			n = bpf_map_lookup_elem(&rss_faults, &fk);
			if (n)
				__sync_fetch_and_add(n, 1);
			else
				rss_count(RC_BUCKETS_FULL, 1);
		}
	}
	struct rss_page_key k = {.tgid = tgid, .addr = addr & ~(size - 1)};
	struct rss_page p = {
	    .size = size,
	    .fault = addr,
	    .memcg = memcg,
	    .cgroup = cgroup,
	    .ts = bpf_ktime_get_ns(),
	    .stack_id = sid,
	};
	if (!p.memcg)
		p.memcg = rss_memcg(task);
	if (bpf_map_update_elem(&rss_pages, &k, &p, BPF_ANY) != 0)
		rss_count(RC_PAGES_FULL, 1);
}

// Per-thread state: the user fault in progress (set at the fault, consumed
// by the anonymous-page counter increment it causes).
struct rss_thread {
	__u64 addr;   // faulting address
	__u64 ip, sp; // user registers at the fault: identify it at the increment
	__s64 count0; // global part of the mm's anonymous-page counter at the fault
	__u32 active;
	__u32 _pad;
	struct rss_verdict v; // is the thread a target (every faulting thread)
};

struct vma_ctx {
	__u64 addr;
	__u32 thp;
};

// vma_check runs with the faulting address's mapping (bpf_find_vma).
static long vma_check(struct task_struct *task, struct vm_area_struct *vma, struct vma_ctx *c)
{
	if (vma->vm_file || vma->vm_ops) // not anonymous memory
		return 0;
	c->thp = rss_thp_expected(rss_thp_mode, vma->vm_flags, vma->vm_start, vma->vm_end, c->addr);
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rss_thread);
} rss_threads SEC(".maps");

// on_fault notes a page fault of a target thread on a user address (in user
// mode, or in the kernel on the process's behalf: read(2) into a fresh
// buffer); regs are the user registers. Non-targets pay the filter only:
// the task-storage lookup and the thread's cached verdict, the target maps
// only when the verdict is stale. Every read is a plain load through a
// trusted BTF pointer (the current task, the tracepoint's arguments). Every
// thread that faults while a target kind is in use gets task storage
// (struct rss_thread, ~64 bytes plus the kernel's ~100-byte element
// header), freed with the thread or when memprof exits.
static __always_inline void on_fault(__u64 address, struct pt_regs *regs)
{
	__u32 kinds = rss_filter_kinds;
	if (!kinds)
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	struct rss_thread *t =
	    bpf_task_storage_get(&rss_threads, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!t)
		return;
	// The generation is read before the maps and the cgroups: a change
	// after this read leaves a verdict the next fault recomputes.
	__u64 gen = rss_target_gen;
	__u64 css = (__u64)task->cgroups;
	if (!rss_verdict_fresh(&t->v, gen, css)) {
		__u64 memcg = (kinds & RSS_KIND_MEMCGS) ? rss_memcg(task) : 0;
		__u64 cgroup = (kinds & RSS_KIND_CGROUPS) ? task->cgroups->dfl_cgrp->kn->id : 0;
		t->v.target = rss_is_target(task->tgid, memcg, cgroup);
		t->v.gen = gen;
		t->v.css = css;
	}
	if (!t->v.target)
		return;
	t->addr = address;
	t->ip = regs->ip;
	t->sp = regs->sp;
	t->count0 = task->mm->rss_stat[MM_ANONPAGES].count;
	t->active = 1;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(rss_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	on_fault(address, regs); // regs: the user registers at the fault
	return 0;
}

SEC("tp_btf/page_fault_kernel")
int BPF_PROG(rss_fault_kernel, unsigned long address, struct pt_regs *regs,
	     unsigned long error_code)
{
	if (address < 0x800000000000ULL) // user half of the x86-64 address space
		on_fault(address, (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf()));
	return 0;
}

// Every change of an mm's RSS counters, of every process. The increment of
// the anonymous-page counter of the current process, during the fault noted
// above (same user registers), is that fault's new anonymous page: a fault
// that failed, a copy-on-write of an anonymous page shared after fork (no
// counter change) or a fault on file pages never gets here. The cheapest
// tests come first: most calls (other counters, other processes' mms, threads
// with no fault noted) end before any helper call but the task-storage
// lookup.
SEC("tp_btf/rss_stat")
int BPF_PROG(rss_stat_hook, struct mm_struct *mm, int member)
{
	if (member != MM_ANONPAGES)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	// A thread with no task storage at all (of any BPF program: it has not
	// faulted since memprof started) has no fault noted: skip the helper
	// call.
	if (task->mm != mm || !task->bpf_storage)
		return 0;
	struct rss_thread *t = bpf_task_storage_get(&rss_threads, task, 0, 0);
	if (!t || !t->active)
		return 0;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (regs->ip != t->ip || regs->sp != t->sp)
		return 0;
	t->active = 0;
	__u32 tgid = task->tgid;
	struct rss_cpu *pc = rss_this_cpu();
	if (!pc)
		return 0;
	// The counter's delta is not passed. A 2 MiB huge page adds 512
	// pages, more than the per-CPU batch (max(32, 2 x CPUs)), so this
	// CPU's part is folded into the global count, which jumps by about 512
	// since the fault began (other CPUs' folds move it a batch at a time).
	// Only then is the mapping looked at: a huge page is expected where
	// THP applies to it. memprof checks the guess against
	// /proc/kpageflags at snapshot time.
	__u64 size = 4096;
	if (rss_thp_mode != THP_NEVER && mm->rss_stat[MM_ANONPAGES].count - t->count0 >= 256) {
		struct vma_ctx c = {.addr = t->addr};
		// Fails (no huge page expected) if the mmap lock is contended.
		bpf_find_vma(task, t->addr, vma_check, &c, 0);
		if (c.thp)
			size = RSS_THP_SIZE;
	}
	pc->counters[RC_FOLIOS]++;
	pc->counters[RC_BYTES] += size;
	__s64 gap = (!rss_sample_all && pc->countdown <= (__s64)size) ? rss_draw_gap() : 1;
	if (!rss_sampled(&pc->countdown, size, gap))
		return 0;
	record(ctx, task, tgid, t->addr, size, 0, bpf_get_current_cgroup_id());
	return 0;
}

// Children of a process marked RT_FOLLOW_FORKS (a command memprof started)
// become targets before they run.
SEC("tp_btf/sched_process_fork")
int BPF_PROG(rss_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = BPF_CORE_READ(parent, tgid), ctgid = BPF_CORE_READ(child, tgid);
	if (ptgid == ctgid)
		return 0; // a thread
	__u8 *f = bpf_map_lookup_elem(&rss_pids, &ptgid);
	if (!f || !(*f & RT_FOLLOW_FORKS))
		return 0;
	__u8 v = *f;
	bpf_map_update_elem(&rss_pids, &ctgid, &v, BPF_ANY);
	return 0;
}

// OOM kills (the victim's task, 6.8+): userspace takes the victim's RSS
// profile at once, before the OOM reaper unmaps its memory.
SEC("tp_btf/mark_victim")
int BPF_PROG(rss_oom, struct task_struct *task)
{
	struct rss_oom_event *e = bpf_ringbuf_reserve(&rss_events, sizeof(*e), 0);
	if (!e) {
		rss_count(RC_EVENTS_LOST, 1);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->type = RE_OOM;
	e->pid = BPF_CORE_READ(task, tgid);
	e->ts = bpf_ktime_get_ns();
	e->memcg = rss_memcg(task);
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (mm)
		e->anon_rss = BPF_CORE_READ(mm, rss_stat[MM_ANONPAGES].count) * 4;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
