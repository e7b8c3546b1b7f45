// SPDX-License-Identifier: GPL-2.0
// Types and decision logic of the RSS tier (rss.bpf.c), shared through
// bpf2go with the Go loader (internal/rss) and with rss_test.bpf.c, which
// runs the decision functions with explicit inputs under BPF_PROG_RUN.
#ifndef MEMPROF_RSS_H
#define MEMPROF_RSS_H

#define RSS_GAP_TABLE_SIZE    4096   // power of two
#define RSS_MAX_PAGES	      131072 // sampled resident folios across all targets
#define RSS_MAX_FAULT_BUCKETS 65536  // (process, stack, folio size) buckets
#define RSS_MAX_STACKS	      16384
#define RSS_MAX_TARGETS	      16384 // pids, memory cgroups, v2 cgroups (each)
#define RSS_STACK_DEPTH	      127
#define RSS_STACK_UNKNOWN     0xffffffffffffffffULL // stack_id of a sample without a stack

// How sampled faults' user stacks are taken (rss_stack_mode).
enum rss_stack_mode {
	RSM_FP = 0,  // frame-pointer walk (bpf_get_stackid): ids of rss_stacks
	RSM_CFI = 1, // CFI walk of unwind.h (uw_walk): keys of uw_stacks
};

// Target flags (values of the rss_pids map).
enum rss_target_flag {
	RT_TARGET = 1,	     // the process is a target
	RT_FOLLOW_FORKS = 2, // its children become targets (a command memprof started)
};

// Counter indexes (names in internal/rss).
enum rss_counter {
	RC_FOLIOS = 0,	    // new anonymous folios of targets seen
	RC_BYTES,	    // their bytes
	RC_SAMPLES,	    // sampled
	RC_PAGES_FULL,	    // sampled-page map full: sample's residency lost
	RC_BUCKETS_FULL,    // fault bucket map full: sample's fault count lost
	RC_STACK_COLLISION, // stack map hash collision: stack lost
	RC_STACK_LOST,	    // other stack walk failure
	RC_EVENTS_LOST,	    // ring buffer full: OOM event lost
	NR_RSS_COUNTERS,
};

// Per-CPU state of the fault path, one map lookup per fault: the sampling
// countdown (bytes to the next sample; a Poisson process over bytes stays
// one when its stream is split among CPUs) and the counters.
struct rss_cpu {
	__s64 countdown;
	__u64 counters[NR_RSS_COUNTERS];
};

struct rss_page_key {
	__u32 tgid;
	__u32 _pad;
	__u64 addr; // first byte of the folio in the process (aligned to its size)
};

struct rss_page {
	__u64 size;	// folio bytes as sampled: 4096, or 2 MiB where a THP was expected
	__u64 fault;	// the faulting address
	__u64 memcg;	// kernfs id of the memory controller's cgroup
	__u64 cgroup;	// cgroup v2 id
	__u64 ts;	// ktime of the fault
	__u64 stack_id; // enum rss_stack_mode's id, or RSS_STACK_UNKNOWN
};

struct rss_fault_key {
	__u32 tgid;
	__u32 _pad;
	__u64 stack_id; // as rss_page.stack_id
	__u64 size;
};

// Events of the ring buffer (OOM kills only: stacks are walked in BPF).
enum rss_event_type {
	RE_OOM = 2,
};

struct rss_oom_event {
	__u32 type;
	__u32 pid; // victim (thread group id)
	__u64 ts;
	__u64 memcg;
	__u64 anon_rss; // KiB (the counters' global part)
	char comm[16];
};

// ---- decision logic -----------------------------------------------------
// Functions of explicit inputs, called by rss.bpf.c and, with inputs from a
// Go table test, by rss_test.bpf.c. They use the maps and globals below.

// Targets: processes (with RT_* flags), v1 memory cgroups (kernfs id) and
// v2 cgroups (id), filled by userspace. A cgroup target lists its
// descendants too (userspace rescans), so BPF does one lookup per kind.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RSS_MAX_TARGETS);
	__type(key, __u32);
	__type(value, __u8);
} rss_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RSS_MAX_TARGETS);
	__type(key, __u64);
	__type(value, __u8);
} rss_memcgs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RSS_MAX_TARGETS);
	__type(key, __u64);
	__type(value, __u8);
} rss_cgroups SEC(".maps");

// Exponential gaps (bytes) between samples: quantiles of Exp(mean = rate)
// filled by userspace; one is drawn at random after each sample.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RSS_GAP_TABLE_SIZE);
	__type(key, __u32);
	__type(value, __u64);
} rss_gaps SEC(".maps");

// Which target maps are in use (set by userspace; an empty kind costs no
// lookup): bit 0 pids, bit 1 memory cgroups, bit 2 v2 cgroups.
volatile __u32 rss_filter_kinds;
// 1: every fault is sampled (--sample-rate 1).
const volatile __u32 rss_sample_all;
// Transparent huge pages for anonymous memory
// (/sys/kernel/mm/transparent_hugepage/enabled): enum rss_thp_mode.
const volatile __u32 rss_thp_mode;

enum rss_thp_mode {
	THP_NEVER = 0,
	THP_MADVISE = 1, // only in regions given MADV_HUGEPAGE
	THP_ALWAYS = 2,
};

#define RSS_VM_HUGEPAGE	  0x20000000ULL // VM_HUGEPAGE (include/linux/mm.h)
#define RSS_VM_NOHUGEPAGE 0x40000000ULL // VM_NOHUGEPAGE
#define RSS_THP_SIZE	  (2ULL << 20)

// rss_thp_expected reports whether a first fault at addr in an anonymous
// mapping [start, end) with flags is expected to map a 2 MiB transparent
// huge page: THP enabled for it, and the aligned 2 MiB around addr inside
// the mapping. (The kernel may still fall back to 4 KiB pages: no huge page
// free, the range already has a page table; memprof corrects that at
// snapshot time from /proc/kpageflags.)
static __always_inline int rss_thp_expected(__u32 mode, __u64 flags, __u64 start, __u64 end,
					    __u64 addr)
{
	if (mode == THP_NEVER || (flags & RSS_VM_NOHUGEPAGE))
		return 0;
	if (mode == THP_MADVISE && !(flags & RSS_VM_HUGEPAGE))
		return 0;
	__u64 h = addr & ~(RSS_THP_SIZE - 1);
	return h >= start && h + RSS_THP_SIZE <= end;
}

#define RSS_KIND_PIDS	 1
#define RSS_KIND_MEMCGS	 2
#define RSS_KIND_CGROUPS 4

// rss_is_target reports whether a fault of process tgid, in memory cgroup
// memcg (v1 kernfs id, 0 if unknown) and v2 cgroup cgroup, is recorded.
static __always_inline int rss_is_target(__u32 tgid, __u64 memcg, __u64 cgroup)
{
	__u32 kinds = rss_filter_kinds;
	if (kinds & RSS_KIND_PIDS) {
		__u8 *f = bpf_map_lookup_elem(&rss_pids, &tgid);
		if (f && (*f & RT_TARGET))
			return 1;
	}
	if ((kinds & RSS_KIND_MEMCGS) && memcg && bpf_map_lookup_elem(&rss_memcgs, &memcg))
		return 1;
	if ((kinds & RSS_KIND_CGROUPS) && cgroup && bpf_map_lookup_elem(&rss_cgroups, &cgroup))
		return 1;
	return 0;
}

// A thread's cached target verdict (kept in its task storage, for every
// thread that faults while some target kind is in use): the filter's
// answer, valid while the target generation and the thread's css_set are
// those it was taken with. Any change of the thread's cgroups (in any
// hierarchy, by any path) gives it another css_set; userspace bumps
// rss_target_gen after every change of the target maps or kinds, and at
// every poll, which bounds to one poll the life of a verdict whose css_set
// was freed and its address reused for the thread's new one. (A bump by a
// tp_btf/cgroup_attach_task program instead made internal/agent's
// TestAgentRSS fail about one run in three, its OOM post-mortem
// unsymbolized, for a reason not found.)
struct rss_verdict {
	__u64 gen; // rss_target_gen when taken (0: none yet)
	__u64 css; // address of the thread's css_set (task->cgroups) when taken
	__u32 target;
	__u32 _pad;
};

volatile __u64 rss_target_gen = 1; // never 0: a fresh (zeroed) verdict is stale

// rss_verdict_fresh reports whether verdict v holds for a thread now in
// css_set css at generation gen (rss_target_gen, read before the inputs of
// a new verdict are).
static __always_inline int rss_verdict_fresh(const struct rss_verdict *v, __u64 gen, __u64 css)
{
	return v->gen == gen && v->css == css;
}

// rss_sampled decides, Poisson over bytes, whether a new folio of size bytes
// is sampled. *countdown is the bytes left to the next sample (0: not
// started yet, take a gap first); gap is a fresh draw from Exp(rate), used
// when a new countdown starts. With the countdown drawn from the
// exponential distribution a folio of size S is sampled with probability
// 1 - exp(-S/rate), the weight Go's heap profiler unsamples with.
static __always_inline int rss_sampled(__s64 *countdown, __u64 size, __s64 gap)
{
	if (rss_sample_all)
		return 1;
	if (gap <= 0)
		gap = 1;
	if (*countdown <= 0)
		*countdown = gap;
	if (*countdown > (__s64)size) {
		*countdown -= size;
		return 0;
	}
	*countdown = gap;
	return 1;
}

// rss_draw_gap draws the distance in bytes to the next sample.
static __always_inline __s64 rss_draw_gap(void)
{
	__u32 idx = bpf_get_prandom_u32() & (RSS_GAP_TABLE_SIZE - 1);
	__u64 *g = bpf_map_lookup_elem(&rss_gaps, &idx);
	return g && *g ? *g : 1;
}

// Inputs and outputs of the BPF_PROG_RUN test program (rss_test.bpf.c).
struct rss_test_ctx {
	__u32 tgid;
	__u32 is_target; // out
	__u64 memcg;
	__u64 cgroup;
	__s64 countdown; // in and out
	__u64 size;
	__s64 gap;
	__u32 sampled; // out
	__u32 thp;     // out: rss_thp_expected(thp_mode, vm_flags, vm_start, vm_end, addr)
	__u32 thp_mode;
	__u32 _pad;
	__u64 vm_flags, vm_start, vm_end, addr;
	// Cached verdict: v is the thread's (in and out), gen and css now;
	// verdict_hit (out) is 1 when v was used, 0 when is_target was
	// computed from the maps and stored in v.
	struct rss_verdict v;
	__u64 gen, css;
	__u32 verdict_hit;
	__u32 _pad2;
};

#endif
