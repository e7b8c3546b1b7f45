//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// Process and cgroup events for internal/procwatch: new processes
// (sched_process_fork, threads left out), execs, process exits (the last
// thread, group_dead), and the creation, removal and joining of cgroups of
// the memory v1 hierarchy and the v2 hierarchy (cgroup_mkdir, cgroup_rmdir,
// cgroup_attach_task; other v1 hierarchies are left out). Each event is a
// small record in a ring buffer; one the ring has no room for is counted in
// drops. Wakeups of the reader are batched (submit, below). BTF tracepoints need CAP_BPF and
// CAP_PERFMON, not CAP_NET_ADMIN as the netlink process connector does.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "procevents.h"

char LICENSE[] SEC("license") = "GPL";

// The types Go decodes (bpf2go -type), kept in the object's BTF.
const struct pw_event *unused_pw_event __attribute__((unused));
const struct pw_cgroup_event *unused_pw_cgroup_event __attribute__((unused));
const volatile enum pw_event_kind unused_pw_kind = PE_FORK;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18); // 256 KiB: ~5000 events in flight
} proc_events SEC(".maps");

// drops counts the events the ring had no room for (one slot, per CPU).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} proc_drops SEC(".maps");

// Wakeups. Waking the reader costs it about 11 us of CPU per wakeup (an
// epoll round trip and a switch to its thread), so a tenant that forks and
// exits thousands of processes a second must not wake it per event. Bulk
// events (fork, exit) wake it only when wake_batch_ns have passed since the
// last wakeup of any event; the events discovery and the recorder's attach
// wait for (exec, cgroup mkdir, rmdir and attach) when wake_prompt_ns have
// passed since the last wakeup of one of them (0, the default: each one);
// any event when the ring holds wake_bytes or more unread. An event sent without a wakeup is read
// at the next wakeup or by the reader's timer: internal/procwatch reads the ring again
// wake_batch_ns after each read that returned records, so none stays
// unread much longer than wake_batch_ns (wake_prompt_ns <= wake_batch_ns).
// wake_batch_ns = 0: every event is submitted with the kernel's default
// (adaptive) wakeup, as before batching (for comparisons). Set by the
// loader.
const volatile __u64 wake_batch_ns = 10000000;
const volatile __u64 wake_prompt_ns = 0;
const volatile __u64 wake_bytes = 1 << 16;

// When (CLOCK_BOOTTIME ns) an event last forced a wakeup, and a prompt
// one. CPUs race on them; every outcome of a race wakes the reader more,
// not less.
__u64 last_wake;
__u64 last_prompt_wake;

// reader_due: the reader reads the ring by then (CLOCK_BOOTTIME ns) with
// or without a wakeup: internal/procwatch sets it to its timer after each
// read that returned records, so a flood's bulk events wake it only when
// its timer has stopped (a read found the ring empty), not on top of it.
__u64 reader_due;

// submit sends e (whose ts is set) and wakes the reader when it is time
// (see wake_batch_ns); prompt: an event discovery waits for.
static __always_inline void submit(struct pw_event *e, int prompt)
{
	if (!wake_batch_ns) {
		bpf_ringbuf_submit(e, 0);
		return;
	}
	// A ts before the last wakeup (another CPU's later event) wakes.
	if ((e->ts - last_wake >= wake_batch_ns && e->ts >= reader_due) ||
	    (prompt && e->ts - last_prompt_wake >= wake_prompt_ns) ||
	    bpf_ringbuf_query(&proc_events, BPF_RB_AVAIL_DATA) >= wake_bytes) {
		// Stored before the wakeup they stand for.
		last_wake = e->ts;
		if (prompt)
			last_prompt_wake = e->ts;
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
		return;
	}
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline int memory_subsys(void)
{
	return bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
}

// reserve_n reserves a record of size bytes (a constant: a pw_event or a
// pw_cgroup_event) that starts with a pw_event of kind, zeroed; NULL (and
// a drop counted) when the ring is full.
static __always_inline struct pw_event *reserve_n(__u32 kind, __u64 size)
{
	struct pw_event *e = bpf_ringbuf_reserve(&proc_events, size, 0);
	if (!e) {
		__u32 k = 0;
		__u64 *n = bpf_map_lookup_elem(&proc_drops, &k);
		if (n)
			*n += 1;
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->ts = bpf_ktime_get_boot_ns();
	return e;
}

static __always_inline struct pw_event *reserve(__u32 kind)
{
	return reserve_n(kind, sizeof(struct pw_event));
}

// task_event fills the process fields of e from task.
static __always_inline void task_event(struct pw_event *e, struct task_struct *task)
{
	int id = memory_subsys();
	e->pid = BPF_CORE_READ(task, pid);
	e->tgid = BPF_CORE_READ(task, tgid);
	e->start = BPF_CORE_READ(task, start_boottime);
	if (id >= 0 && id < CGROUP_SUBSYS_COUNT)
		e->memcg = BPF_CORE_READ(task, cgroups, subsys[id], cgroup, kn, id);
	e->cgroup = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	// On a pure v2 host the memory controller is on the default hierarchy:
	// both ids are the same cgroup's.
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(pe_fork, struct task_struct *parent, struct task_struct *child)
{
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0; // a thread
	struct pw_event *e = reserve(PE_FORK);
	if (!e)
		return 0;
	task_event(e, child);
	e->ppid = BPF_CORE_READ(parent, tgid);
	e->ptid = BPF_CORE_READ(parent, pid);
	submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(pe_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct pw_event *e = reserve(PE_EXEC);
	if (!e)
		return 0;
	task_event(e, p);
	submit(e, 1);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(pe_exit, struct task_struct *p, bool group_dead)
{
	if (!group_dead)
		return 0; // other threads of the process still run
	struct pw_event *e = reserve(PE_EXIT);
	if (!e)
		return 0;
	task_event(e, p);
	e->pid = e->tgid; // the process ended (p may be a thread other than its leader)
	submit(e, 0);
	return 0;
}

// cgroup_kind tells whether cgrp is in the memory v1 hierarchy (1), the v2
// one (hierarchy 0: 2) or another v1 hierarchy (0, not reported).
static __always_inline int cgroup_kind(struct cgroup *cgrp)
{
	int mem = memory_subsys();
	struct cgroup_root *root = BPF_CORE_READ(cgrp, root);
	int hier = BPF_CORE_READ(root, hierarchy_id);
	unsigned int mask = BPF_CORE_READ(root, subsys_mask);
	if (hier == 0)
		return 2;
	return mem >= 0 && mem < 32 && (mask & (1u << mem)) ? 1 : 0;
}

// cgroup_fill puts cgrp's id in the field of its hierarchy, and its depth.
static __always_inline void cgroup_fill(struct pw_event *e, struct cgroup *cgrp, int kind)
{
	__u64 id = BPF_CORE_READ(cgrp, kn, id);
	if (kind == 1)
		e->memcg = id;
	else
		e->cgroup = id;
	e->level = BPF_CORE_READ(cgrp, level);
}

// cgroup_dir_event sends a mkdir or rmdir of cgrp with its path.
static __always_inline void cgroup_dir_event(__u32 kind, struct cgroup *cgrp, const char *path)
{
	int k = cgroup_kind(cgrp);
	if (!k)
		return;
	struct pw_event *e = reserve_n(kind, sizeof(struct pw_cgroup_event));
	if (!e)
		return;
	struct pw_cgroup_event *ce = (struct pw_cgroup_event *)e;
	cgroup_fill(e, cgrp, k);
	long n = bpf_probe_read_kernel_str(ce->path, sizeof(ce->path), path);
	if (n < 0)
		ce->path[0] = 0;
	submit(e, 1);
}

SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(pe_cgroup_mkdir, struct cgroup *cgrp, const char *path)
{
	cgroup_dir_event(PE_CGROUP_MKDIR, cgrp, path);
	return 0;
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(pe_cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	cgroup_dir_event(PE_CGROUP_RMDIR, cgrp, path);
	return 0;
}

SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(pe_cgroup_attach, struct cgroup *dst, const char *path, struct task_struct *task,
	     bool threadgroup)
{
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0; // a thread (its leader's move is reported)
	int k = cgroup_kind(dst);
	if (!k)
		return 0;
	struct pw_event *e = reserve(PE_CGROUP_ATTACH);
	if (!e)
		return 0;
	cgroup_fill(e, dst, k);
	e->pid = BPF_CORE_READ(task, pid);
	e->tgid = BPF_CORE_READ(task, tgid);
	e->start = BPF_CORE_READ(task, start_boottime);
	submit(e, 1);
	return 0;
}
