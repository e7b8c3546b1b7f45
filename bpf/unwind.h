// SPDX-License-Identifier: GPL-2.0
// CFI stack unwinding in BPF, shared by memprof's tiers.
//
// A tier includes this header and calls uw_walk(pid, ip, sp, bp) with the
// user registers of the sampled thread; the frames are left in the per-CPU
// walk state it returns, which it hands back with uw_release. Userspace
// (internal/unwindtable) keeps the tables in the maps below:
//
//   uw_procs    pid -> the process's executable mappings, sorted by start:
//               [start, end) -> object (table id) and bias
//   uw_objects  table id -> range of rows in uw_rows, and its state
//   uw_rows     every object's rows, each table a contiguous range sorted by
//               pc: (pc - bias) as 32 bits -> rule index
//   uw_rules    deduplicated rules: how to get the CFA, return address and
//               rbp of the caller
//   uw_stale    processes whose walks met unknown code (to rescan)
//   uw_stats    walks by outcome (enum uw_status)
//
// One shared row array rather than an array of maps: the rows of all objects
// are preallocated once (the total memory bound, 8 bytes a row), lookups are
// plain array accesses the verifier inlines, and adding an object is one
// batch update of its rows plus one object entry; no map is created per
// object. Userspace allocates ranges in the array and evicts objects when it
// is full.
//
// Each frame: find the mapping of pc (the previous frame's mapping is tried
// first), binary-search the object's rows (bounded loop), evaluate the rule,
// read the return address (and rbp when saved) with uw_read. Objects
// without CFI, and gaps between FDEs, use the frame-pointer rule. A walk that
// cannot complete ends with a truncated status, counted in uw_stats.
//
// The per-frame step is a global (non-inlined, separately verified)
// function, so the verifier checks it once rather than once per frame (about
// 5,500 instructions in all, against Parca's and the OTel profiler's tail
// calls). It needs bounded loops (5.3), bpf_probe_read_user (5.5), global
// functions with pointer arguments and atomic compare-and-swap (5.12): no
// bpf_loop, so 5.15 kernels load it (developed and tested on 6.18 only).
//
// Walk states: uprobe programs run preemptibly, so two walks may interleave
// on one CPU; each walk claims one of UW_SCRATCH_SLOTS per-CPU states with a
// compare-and-swap and the caller releases it (uw_release).
#ifndef MEMPROF_UNWIND_H
#define MEMPROF_UNWIND_H

#include <bpf/bpf_core_read.h>

#define UW_MAX_FRAMES	  127	    // frames per walk (unwindtable.MaxFrames; as MAX_STACK_DEPTH)
#define UW_MAX_MAPPINGS	  512	    // executable mappings per process (power of two)
#define UW_MAPPING_STEPS  10	    // log2(UW_MAX_MAPPINGS) + 1
#define UW_MAX_TABLE_ROWS (1 << 23) // rows of one object's table
#define UW_ROW_STEPS	  24	    // log2(UW_MAX_TABLE_ROWS) + 1
#define UW_MAX_ROWS	  (1 << 22) // default total rows (32 MiB); resized by userspace before load
#define UW_MAX_RULES	  65536	    // distinct rules of all objects
#define UW_MAX_OBJECTS	  16384	    // table ids
#define UW_MAX_PROCS	  8192	    // processes with mappings

// How the CFA of a row is computed (struct uw_rule.cfa).
enum uw_cfa_kind {
	UW_CFA_RSP = 1,	 // CFA = rsp + cfa_off
	UW_CFA_RBP = 2,	 // CFA = rbp + cfa_off
	UW_CFA_PLT = 3,	 // PLT entry: rsp + 8, + 8 more once (rip & 15) >= cfa_off
	UW_CFA_FP = 4,	 // no CFI here: the frame-pointer rule
	UW_CFA_STOP = 5, // not evaluable here (unknown expression, register)
	// Signal trampoline: the interrupted rsp (= CFA) saved at rsp + cfa_off,
	// its rip right after, its rbp at rsp + bp_off; the caller's pc is exact.
	UW_CFA_SIGNAL = 6,
};

// Where the return address is (struct uw_rule.ra).
enum uw_ra_kind {
	UW_RA_SAVED = 0, // at CFA - 8
	UW_RA_END = 1,	 // undefined: outermost frame
};

// How the caller's rbp is recovered (struct uw_rule.bp).
enum uw_bp_kind {
	UW_BP_SAME = 0,	 // unchanged
	UW_BP_SAVED = 1, // saved at CFA + bp_off
	UW_BP_UNDEF = 2, // unknown
};

// How a walk ended (struct uw_state.status; index of uw_stats).
enum uw_status {
	UW_COMPLETE = 0,	  // reached the outermost frame
	UW_TRUNC_MAX_FRAMES = 1,  // UW_MAX_FRAMES reached
	UW_TRUNC_NO_MAPPING = 2,  // pc in no known mapping (or process unknown)
	UW_TRUNC_PENDING = 3,	  // the object's table is not loaded yet
	UW_TRUNC_UNSUPPORTED = 4, // an UW_CFA_STOP row
	UW_TRUNC_READ = 5,	  // a memory read failed
	UW_TRUNC_BAD_FRAME = 6,	  // CFA not above rsp, unusable frame pointer, rbp unknown
	UW_TRUNC_MAP = 7,	  // a table lookup failed (inconsistent maps)
	UW_BUSY = 8,		  // no free walk state on this CPU: no walk
	UW_TRUNC_URETPROBE = 9,	  // a return address replaced by a uretprobe, not resolved
	UW_NR_STATUS = 10,
};

// State of a table id (struct uw_object.state).
enum uw_object_state {
	UW_OBJ_PENDING = 0, // table being built (or id unused)
	UW_OBJ_READY = 1,   // rows loaded
	UW_OBJ_NO_CFI = 2,  // object without CFI: the frame-pointer rule everywhere
};

struct uw_row {
	__u32 pc;   // bytes from the table base (mapping bias folds it in)
	__u32 rule; // index in uw_rules
};

struct uw_rule {
	__u8 cfa; // enum uw_cfa_kind
	__u8 ra;  // enum uw_ra_kind
	__u8 bp;  // enum uw_bp_kind
	__u8 pad;
	__s32 cfa_off;
	__s32 bp_off;
};

struct uw_object {
	__u32 first_row; // index of the table's first row in uw_rows
	__u32 nrows;
	__u32 state; // enum uw_object_state
	__u32 pad;
};

struct uw_mapping {
	__u64 start, end; // [start, end) of the executable mapping
	__u64 bias;	  // pc - bias = row pc (load bias + table base)
	__u32 object;	  // table id
	__u32 pad;
};

struct uw_proc {
	__u32 n; // mappings used, sorted by start, non-overlapping
	__u32 pad;
	struct uw_mapping maps[UW_MAX_MAPPINGS];
};

// A walk's result: pcs[0..n) and how it ended. check is a second hash of
// it, set by uw_intern.
struct uw_stack {
	__u64 check;
	__u32 n;
	__u32 status; // enum uw_status
	__u64 pcs[UW_MAX_FRAMES];
};

// Per-CPU state of a walk; stack holds the frames when it returns.
struct uw_state {
	__u32 busy; // claimed by a walk (uprobe programs can be preempted mid-walk)
	__u32 pid;
	__u64 pc, sp, bp;
	__u64 ra_slot; // where pc was read from (0: not a saved return address)
	__u8 bp_valid; // bp holds a known value
	__u8 exact;    // pc is exact (first frame), else a return address
	__u16 pad;
	__u32 object;		      // table id of the cached mapping
	__u64 m_start, m_end, m_bias; // the last mapping used (m_end 0: none)
	__u32 lo, hi;		      // binary search bounds
	struct uw_stack stack;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UW_MAX_PROCS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct uw_proc);
} uw_procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UW_MAX_OBJECTS);
	__type(key, __u32);
	__type(value, struct uw_object);
} uw_objects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UW_MAX_ROWS);
	__type(key, __u32);
	__type(value, struct uw_row);
} uw_rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UW_MAX_RULES);
	__type(key, __u32);
	__type(value, struct uw_rule);
} uw_rules SEC(".maps");

// Walk states: UW_SCRATCH_SLOTS per CPU, each claimed with a compare-and-
// swap for one walk. Several because uprobe programs run preemptibly: a walk
// preempted on a CPU must not share its state with the next walk there.
#define UW_SCRATCH_SLOTS 4 // uw_walk tries each in turn

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UW_SCRATCH_SLOTS);
	__type(key, __u32);
	__type(value, struct uw_state);
} uw_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UW_NR_STATUS);
	__type(key, __u32);
	__type(value, __u64);
} uw_stats SEC(".maps");

// Processes whose walk met a pc outside every known mapping: code mapped
// since userspace last listed its mappings (dlopen). Userspace rescans
// them (unwindtable.Store.Refresh) and deletes the entry.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} uw_stale SEC(".maps");

#ifdef UW_SNAPSHOT
// Test build: user memory is a snapshot of [base, base+len) of the target's
// stack, held at uaddr in the test process's own memory (the program runs
// through BPF_PROG_RUN in the test's context), read with the same helper as
// the production build.
struct uw_snapshot {
	__u64 base, len, uaddr;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uw_snapshot);
} uw_snap SEC(".maps");

static __always_inline long uw_read(__u64 *dst, __u64 addr)
{
	__u32 zero = 0;
	struct uw_snapshot *sn = bpf_map_lookup_elem(&uw_snap, &zero);
	*dst = 0;
	if (!sn || addr < sn->base || sn->len < 8 || addr - sn->base > sn->len - 8)
		return -1;
	return bpf_probe_read_user(dst, sizeof(*dst), (void *)(sn->uaddr + (addr - sn->base)));
}
#else
// uw_read reads the 8-byte word at user address addr (0 on failure).
static __always_inline long uw_read(__u64 *dst, __u64 addr)
{
	return bpf_probe_read_user(dst, sizeof(*dst), (void *)addr);
}
#endif

// The binary searches keep their bounds in the per-CPU state (map memory,
// whose contents the verifier does not track) rather than in registers:
// otherwise it follows every path of every search step separately and gives
// up at its instruction limit. Bounds are checked, never clamped, for the
// same reason.

// uw_find_mapping sets s's cached mapping to the one holding addr.
static __always_inline int uw_find_mapping(struct uw_state *s, __u64 addr)
{
	__u32 pid = s->pid;
	struct uw_proc *p = bpf_map_lookup_elem(&uw_procs, &pid);
	if (!p || p->n > UW_MAX_MAPPINGS)
		return -1;
	s->lo = 0;
	s->hi = p->n;
	// Last mapping with start <= addr.
	for (int i = 0; i < UW_MAPPING_STEPS; i++) {
		__u32 lo = s->lo, hi = s->hi;
		if (lo >= hi)
			break;
		__u32 mid = (lo + hi) / 2;
		if (mid >= UW_MAX_MAPPINGS)
			return -1;
		if (p->maps[mid].start <= addr)
			s->lo = mid + 1;
		else
			s->hi = mid;
	}
	__u32 lo = s->lo;
	if (lo == 0 || lo > UW_MAX_MAPPINGS)
		return -1;
	struct uw_mapping *m = &p->maps[(lo - 1) & (UW_MAX_MAPPINGS - 1)];
	if (addr >= m->end)
		return -1;
	s->m_start = m->start;
	s->m_end = m->end;
	s->m_bias = m->bias;
	s->object = m->object;
	return 0;
}

// uw_find_rule returns the rule of row pc rpc in object o, or NULL where
// the frame-pointer rule applies (before the first row); NULL with *status
// set when a lookup fails.
static __always_inline struct uw_rule *uw_find_rule(struct uw_state *s, struct uw_object *o,
						    __u32 rpc, int *status)
{
	__u32 first = o->first_row;
	if (o->nrows > UW_MAX_TABLE_ROWS) {
		*status = UW_TRUNC_MAP;
		return NULL;
	}
	s->lo = 0;
	s->hi = o->nrows;
	// Last row with pc <= rpc.
	for (int i = 0; i < UW_ROW_STEPS; i++) {
		__u32 lo = s->lo, hi = s->hi;
		if (lo >= hi)
			break;
		__u32 mid = (lo + hi) / 2, key = first + mid;
		struct uw_row *r = bpf_map_lookup_elem(&uw_rows, &key);
		if (!r) {
			*status = UW_TRUNC_MAP;
			return NULL;
		}
		if (r->pc <= rpc)
			s->lo = mid + 1;
		else
			s->hi = mid;
	}
	__u32 lo = s->lo;
	if (lo == 0)
		return NULL; // before the table: frame pointer
	__u32 key = first + lo - 1;
	struct uw_row *r = bpf_map_lookup_elem(&uw_rows, &key);
	if (!r) {
		*status = UW_TRUNC_MAP;
		return NULL;
	}
	key = r->rule;
	struct uw_rule *rule = bpf_map_lookup_elem(&uw_rules, &key);
	if (!rule)
		*status = UW_TRUNC_MAP;
	return rule;
}

#define UW_MAX_URETPROBES 8 // pending uretprobes searched per replaced return address

// uw_trampoline returns the address of the current process's uretprobe
// trampoline (its uprobes XOL page), 0 if it has none.
static __always_inline __u64 uw_trampoline(void)
{
#ifdef UW_SNAPSHOT
	return 0; // the walk reads a snapshot, not the current task's stack
#else
	struct task_struct *task = bpf_get_current_task_btf();
	return BPF_CORE_READ(task, mm, uprobes_state.xol_area, vaddr);
#endif
}

// uw_orig_ret returns the return address a pending uretprobe replaced by
// its trampoline's address in slot: the kernel keeps it in the thread's
// return instances, keyed by the stack pointer at the probed function's
// entry (the slot). 0 when it is not found.
static __always_inline __u64 uw_orig_ret(__u64 slot)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct return_instance *ri = BPF_CORE_READ(task, utask, return_instances);
	for (int i = 0; i < UW_MAX_URETPROBES && ri; i++) {
		if (BPF_CORE_READ(ri, stack) == slot)
			return BPF_CORE_READ(ri, orig_ret_vaddr);
		ri = BPF_CORE_READ(ri, next);
	}
	return 0;
}

// uw_step unwinds one frame of walk state s: it records pc and computes
// the caller's registers. It returns 0 to continue, 1 when the walk has
// ended (status set). A global function: verified once, whatever the number
// of frames (pointer arguments to global functions: 5.12).
__attribute__((noinline)) int uw_step(struct uw_state *s)
{
	if (!s)
		return 1;
	__u64 pc = s->pc, sp = s->sp, bp = s->bp;
	if (pc == 0) {
		s->stack.status = UW_COMPLETE;
		return 1;
	}
	__u32 n = s->stack.n;
	if (n >= UW_MAX_FRAMES) {
		s->stack.status = UW_TRUNC_MAX_FRAMES;
		return 1;
	}
	s->stack.pcs[n] = pc;
	s->stack.n = n + 1;
	if (n + 1 >= UW_MAX_FRAMES) {
		s->stack.status = UW_TRUNC_MAX_FRAMES;
		return 1;
	}
	__u64 addr = s->exact ? pc : pc - 1; // the call instruction for a return address
	if ((addr < s->m_start || addr >= s->m_end) && uw_find_mapping(s, addr)) {
		// A pending uretprobe's trampoline in place of the return address?
		// (Checked only here, off the common path.)
		if (s->ra_slot && pc == uw_trampoline()) {
			pc = uw_orig_ret(s->ra_slot);
			if (!pc) {
				s->stack.status = UW_TRUNC_URETPROBE;
				return 1;
			}
			s->pc = pc;
			s->stack.pcs[n] = pc;
			addr = pc - 1;
			if (uw_find_mapping(s, addr))
				goto unmapped;
		} else {
		unmapped:;
			__u32 pid = s->pid;
			__u8 one = 1;
			bpf_map_update_elem(&uw_stale, &pid, &one, BPF_ANY);
			s->stack.status = UW_TRUNC_NO_MAPPING;
			return 1;
		}
	}
	__u32 id = s->object;
	struct uw_object *o = bpf_map_lookup_elem(&uw_objects, &id);
	if (!o || o->state == UW_OBJ_PENDING) {
		s->stack.status = UW_TRUNC_PENDING;
		return 1;
	}
	__u8 cfa_kind = UW_CFA_FP, ra_kind = UW_RA_SAVED, bp_kind = UW_BP_SAME;
	__s32 cfa_off = 0, bp_off = 0;
	__u64 rpc = addr - s->m_bias;
	if (o->state == UW_OBJ_READY && rpc <= 0xffffffffULL) {
		int status = UW_COMPLETE;
		struct uw_rule *r = uw_find_rule(s, o, (__u32)rpc, &status);
		if (status != UW_COMPLETE) {
			s->stack.status = status;
			return 1;
		}
		if (r) {
			cfa_kind = r->cfa;
			ra_kind = r->ra;
			bp_kind = r->bp;
			cfa_off = r->cfa_off;
			bp_off = r->bp_off;
		}
	}

	__u64 cfa, ra, nbp;
	switch (cfa_kind) {
	case UW_CFA_FP:
		if (!s->bp_valid || bp < sp || (bp & 7)) {
			s->stack.status = UW_TRUNC_BAD_FRAME;
			return 1;
		}
		if (uw_read(&ra, bp + 8) || uw_read(&nbp, bp)) {
			s->stack.status = UW_TRUNC_READ;
			return 1;
		}
		s->pc = ra;
		s->ra_slot = bp + 8;
		s->sp = bp + 16;
		s->bp = nbp;
		s->bp_valid = 1;
		s->exact = 0;
		return 0;
	case UW_CFA_RSP:
		cfa = sp + (__s64)cfa_off;
		break;
	case UW_CFA_RBP:
		if (!s->bp_valid) {
			s->stack.status = UW_TRUNC_BAD_FRAME;
			return 1;
		}
		cfa = bp + (__s64)cfa_off;
		break;
	case UW_CFA_SIGNAL:
		if (uw_read(&cfa, sp + (__s64)cfa_off)) {
			s->stack.status = UW_TRUNC_READ;
			return 1;
		}
		if (cfa <= sp) {
			s->stack.status = UW_TRUNC_BAD_FRAME;
			return 1;
		}
		if (uw_read(&ra, sp + (__s64)cfa_off + 8)) {
			s->stack.status = UW_TRUNC_READ;
			return 1;
		}
		if (bp_kind == UW_BP_SAVED) {
			s->bp_valid = uw_read(&nbp, sp + (__s64)bp_off) == 0;
			s->bp = nbp;
		} else if (bp_kind == UW_BP_UNDEF) {
			s->bp_valid = 0;
		}
		s->pc = ra;
		s->ra_slot = 0;
		s->sp = cfa;
		s->exact = 1; // the interrupted instruction itself
		return 0;
	case UW_CFA_PLT:
		cfa = sp + 8;
		if ((__s64)(pc & 15) >= (__s64)cfa_off)
			cfa += 8;
		break;
	default:
		s->stack.status = UW_TRUNC_UNSUPPORTED;
		return 1;
	}
	if (cfa <= sp) {
		s->stack.status = UW_TRUNC_BAD_FRAME;
		return 1;
	}
	if (ra_kind == UW_RA_END) {
		s->stack.status = UW_COMPLETE;
		return 1;
	}
	if (uw_read(&ra, cfa - 8)) {
		s->stack.status = UW_TRUNC_READ;
		return 1;
	}
	if (bp_kind == UW_BP_SAVED) {
		s->bp_valid = uw_read(&nbp, cfa + (__s64)bp_off) == 0;
		s->bp = nbp;
	} else if (bp_kind == UW_BP_UNDEF) {
		s->bp_valid = 0;
	}
	s->pc = ra;
	s->ra_slot = cfa - 8;
	s->sp = cfa;
	s->exact = 0;
	return 0;
}

static __always_inline void uw_count(__u32 status)
{
	__u64 *c = bpf_map_lookup_elem(&uw_stats, &status);
	if (c)
		*c += 1;
}

// uw_claim takes walk state slot of this CPU if no walk uses it.
static __always_inline struct uw_state *uw_claim(__u32 slot)
{
	struct uw_state *c = bpf_map_lookup_elem(&uw_scratch, &slot);
	if (c && __sync_val_compare_and_swap(&c->busy, 0, 1) == 0)
		return c;
	return NULL;
}

// uw_walk unwinds the user stack of process pid from registers ip, sp,
// bp. It returns the walk's state (pcs[0..n), status), which the caller
// must hand back with uw_release once it has copied the frames, or NULL
// when every state of this CPU is in use (counted as UW_BUSY). The outcome
// is counted in uw_stats.
static __always_inline struct uw_state *uw_walk(__u32 pid, __u64 ip, __u64 sp, __u64 bp)
{
	struct uw_state *s = uw_claim(0);
	if (!s)
		s = uw_claim(1);
	if (!s)
		s = uw_claim(2);
	if (!s)
		s = uw_claim(3);
	if (!s) {
		uw_count(UW_BUSY);
		return NULL;
	}
	s->pc = ip;
	s->sp = sp;
	s->bp = bp;
	s->pid = pid;
	s->stack.n = 0;
	s->bp_valid = 1;
	s->exact = 1;
	s->stack.status = UW_TRUNC_MAX_FRAMES;
	s->ra_slot = 0;
	s->m_start = 0;
	s->m_end = 0;
	for (int i = 0; i < UW_MAX_FRAMES; i++) {
		if (uw_step(s))
			break;
	}
	uw_count(s->stack.status);
	return s;
}

// uw_release frees a state uw_walk returned.
static __always_inline void uw_release(struct uw_state *s)
{
	asm volatile("" ::: "memory"); // the frames are read before the state is freed
	s->busy = 0;
}

// Interned stacks: uw_intern stores each distinct walk result once, keyed
// by a 64-bit hash of its frames and status, checked against a second hash
// so that a hash collision is detected (and counted) rather than merging two
// stacks. Sized by userspace (MapSpec.MaxEntries) before loading.
#define UW_MAX_STACKS 32768 // default; resized by userspace before load

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UW_MAX_STACKS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct uw_stack);
} uw_stacks SEC(".maps");

// Outcomes of uw_intern (index of uw_intern_stats).
enum uw_intern_result {
	UW_INTERN_NEW = 0,	 // a stack not seen before, stored
	UW_INTERN_FOUND = 1,	 // already stored
	UW_INTERN_COLLISION = 2, // both slots of its hash hold other stacks: not stored
	UW_INTERN_FULL = 3,	 // uw_stacks full: not stored
	UW_INTERN_NR = 4,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UW_INTERN_NR);
	__type(key, __u32);
	__type(value, __u64);
} uw_intern_stats SEC(".maps");

static __always_inline void uw_intern_count(__u32 r)
{
	__u64 *c = bpf_map_lookup_elem(&uw_intern_stats, &r);
	if (c)
		*c += 1;
}

// uw_intern_slot stores st under key, or finds it there: 1 if the slot
// holds st, 0 if it holds another stack, -1 if the map is full.
static __always_inline int uw_intern_slot(__u64 key, struct uw_stack *st)
{
	struct uw_stack *e = bpf_map_lookup_elem(&uw_stacks, &key);
	if (!e) {
		long err = bpf_map_update_elem(&uw_stacks, &key, st, BPF_NOEXIST);
		if (err == 0) {
			uw_intern_count(UW_INTERN_NEW);
			return 1;
		}
		e = bpf_map_lookup_elem(&uw_stacks, &key); // stored meanwhile by another CPU?
		if (!e)
			return -1;
	}
	if (e->check == st->check && e->n == st->n && e->status == st->status) {
		uw_intern_count(UW_INTERN_FOUND);
		return 1;
	}
	return 0;
}

// uw_intern stores the stack of walk state s in uw_stacks and returns its
// key, or 0 when it could not be stored (collision or full map: counted in
// uw_intern_stats). Costs one pass over the frames plus one or two lookups.
static __always_inline __u64 uw_intern(struct uw_state *s)
{
	struct uw_stack *st = &s->stack;
	__u32 n = st->n;
	if (n > UW_MAX_FRAMES)
		return 0;
	// FNV-1a over whole words, and a multiplicative second hash.
	__u64 h = 0xcbf29ce484222325ULL ^ st->status, h2 = 0x9e3779b97f4a7c15ULL + n;
	for (int i = 0; i < UW_MAX_FRAMES; i++) {
		if (i >= n)
			break;
		__u64 pc = st->pcs[i];
		h = (h ^ pc) * 0x100000001b3ULL;
		h2 = ((h2 ^ pc) * 0xbf58476d1ce4e5b9ULL) ^ (h2 >> 31);
	}
	st->check = h2;
	h |= 1; // 0 means "not stored"
	int r = uw_intern_slot(h, st);
	if (r > 0)
		return h;
	if (r == 0) { // another stack holds the slot: the alternate one
		__u64 alt = h ^ 0x8000000000000000ULL;
		r = uw_intern_slot(alt, st);
		if (r > 0)
			return alt;
	}
	uw_intern_count(r == 0 ? UW_INTERN_COLLISION : UW_INTERN_FULL);
	return 0;
}

#endif
