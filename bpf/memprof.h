// SPDX-License-Identifier: GPL-2.0
// Types shared by memprof.bpf.c and, through bpf2go, the Go loader.
#ifndef MEMPROF_H
#define MEMPROF_H

// Sizes and flags shared with Go: an enum so that bpf2go generates them
// (MemprofLimit*), never copied by hand.
enum bounds {
	GAP_TABLE_SIZE = 4096,	   // power of two
	MAX_LIVE = 262144,	   // sampled live blocks across all targets
	MAX_ALLOC_BUCKETS = 65536, // (process, stack, size) buckets
	MAX_STACKS = 32768,
	MAX_RET_STACKS = 16384, // stacks taken at return instructions (see ret_stacks)
	MAX_PROCS = 16384,	// processes with a call count
	MAX_STACK_DEPTH = 127,
	MAX_CALL_FNS = 3, // functions of one pending call remembered for nested calls
};

// Stack id values and flags (live_block.stack_id, alloc_key.stack_id) of
// values below 2^32. Ids from 2^32 up are keys of uw_stacks (SM_CFI mode:
// 64-bit hashes, see uw_intern).
enum stack_id_flag {
	STACK_RET = 0x40000000,	    // a key of ret_stacks: a stack taken at a return instruction
	STACK_DWARF = 0x80000000,   // a sequence number of a stack_event
	STACK_UNKNOWN = 0xffffffff, // the stack walk failed
};

#ifndef EEXIST
#define EEXIST 17
#endif

// Allocator function kinds: the low byte of a probe's cookie. Go's
// attach.Kind uses the generated constants.
enum probe_kind {
	P_MALLOC = 0,
	P_CALLOC,
	P_MEMALIGN,
	P_POSIX_MEMALIGN,
	P_REALLOC,
	P_REALLOCARRAY,
	P_XALLOCX,
	P_FREE,
};

// A probe's cookie: kind | flags | site | COOKIE_OFF(probe offset in the
// function) | COOKIE_SIZE(function size). The offset and size let a nested
// call check that it was made from inside the pending call's functions.
enum probe_cookie {
	P_KIND_MASK = 0xff,
	P_WRAPPER = 0x100,  // the function calls other allocator entry points: always pending
	P_RETSITES = 0x200, // its return is taken at its ret instructions (no return probe)
	// It forwards the allocation to another allocator entry point it calls
	// (libstdc++'s operator new -> malloc), whose return records the block
	// for it: only its entry is probed (see begin in calls.h).
	P_FORWARD = 0x400,
	SITE_MASK = 0x3000,
	SITE_ENTRY = 0x0000, // the function's entry
	SITE_RET = 0x1000,   // a ret instruction of a P_RETSITES function (or of code it jumps to)
	SITE_TAIL = 0x2000,  // a jmp from a probed function to another allocator function
	COOKIE_OFF_SHIFT = 16,	// bits 16..31: probe offset from the function start
	COOKIE_SIZE_SHIFT = 32, // bits 32..63: function size in bytes
};

// A pending call's forwarding state (pending.fwd).
enum fwd_state {
	FWD_NONE = 0,
	FWD_OUTER = 1,	// a P_FORWARD call waiting for the allocation it forwards to
	FWD_INNER = 2,	// that allocation is the pending call: its return records the block
	FWD_FAILED = 3, // FWD_OUTER after a forwarded allocation failed (new_handler retry)
};

// Pending call kinds.
enum call_kind {
	K_PTR = 1,     // returns the block (malloc, calloc, new, memalign, ...)
	K_MEMPTR = 2,  // posix_memalign: returns 0, block stored through ptr
	K_REALLOC = 3, // realloc, reallocarray, rallocx: ptr is the old block
	K_XALLOCX = 4, // jemalloc xallocx: resizes ptr in place, returns size
};

// Counter indexes (see internal/memprof for their names).
enum counter {
	C_CALLS = 0,	   // allocating calls seen
	C_FREES,	   // free-like calls seen
	C_SAMPLES,	   // sampled allocations tracked
	C_NESTED,	   // calls nested in another allocator call (left to the outer)
	C_MISSED_RETURN,   // pending calls abandoned without a return (longjmp, exception, lost
			   // probe)
	C_NO_THREAD_STATE, // task storage unavailable: call lost
	C_LIVE_FULL,	   // live map full: sampled block lost
	C_ALLOCS_FULL,	   // alloc bucket map full: sample's alloc count lost
	C_STACK_COLLISION, // stack map hash collision: stack lost
	C_STACK_LOST,	   // other stack walk failure
	C_READ_FAILED, // user memory read failed (posix_memalign result, return address at a ret
		       // site)
	C_EVENTS_LOST, // ring buffer full (OOM event, or a stack copy: then the frame-pointer stack
		       // is used, in SM_CFI mode the truncated CFI walk)
	C_STACK_COPIES,	  // stacks copied for userspace unwinding
	C_TAIL_CALLS,	  // tail jumps from an allocator function to another
	C_FORWARD_UNSEEN, // P_FORWARD calls abandoned before the allocation they forward to began
	NR_COUNTERS,
};

struct fn_range {
	__u64 lo, hi; // [lo, hi): code of a function entered by the call
};

struct pending {
	__u64 sp;  // stack pointer at entry (it points at the return address): identifies the call
	__u64 ret; // the return address at entry: the frame is live while [sp] holds it
	__u64 size;
	__u64 ptr;			   // old block (realloc) or result slot (posix_memalign)
	struct fn_range fns[MAX_CALL_FNS]; // the outer function and the nested ones entered so far
	__u8 nfns;
	__u8 kind;
	__u8 sampled;
	__u8 tail; // the outer function tail-jumped: an entry at sp continues the call
	__u8 fwd;  // enum fwd_state
	__u8 _pad[3];
	// A P_FORWARD call's entry registers: its block's stack is taken as if
	// at its return (pc osp's return address oret, sp osp+8, rbp obp).
	__u64 osp, oret, obp;
};

#define CALLS_FLUSH 4096 // per-thread calls counted before they are added to the process's count

// Per-thread state. Only the outermost allocator call of a thread is
// pending at a time: calls nested in it are left to it.
struct thread_state {
	__s64 countdown; // bytes until the next sample
	__u32 active;	 // pending holds a call whose return has not been seen
	__u32 calls;	 // allocator calls not yet added to proc_calls
	struct pending pending;
};

struct live_key {
	__u32 tgid;
	__u32 _pad;
	__u64 addr;
};

struct live_block {
	__u64 size;
	__u64 memcg;	// kernfs id of the memory controller's cgroup (v1 memcg on hybrid hosts)
	__u64 cgroup;	// cgroup v2 id
	__u64 ts;	// ktime of the allocation
	__u64 stack_id; // see enum stack_id_flag; in SM_CFI mode a key of uw_stacks
};

// A stack taken at a return instruction: the frame-pointer walk there
// (stack_id) has the allocator function as its first frame and misses the
// caller, whose address is the return address at [sp]; userspace shows
// caller + frames[1:], what a return probe would have seen.
struct ret_stack {
	__u32 stack_id;
	__u32 _pad;
	__u64 caller;
};

struct alloc_key {
	__u32 tgid;
	__u32 _pad;
	__u64 stack_id;
	__u64 size;
};

enum event_type {
	EV_OOM = 1,
	EV_STACK = 2,
};

#define STACK_COPY                                                                                 \
	8192 // bytes of user stack copied for userspace unwinding (perf's default for --call-graph
	     // dwarf)

// Stack modes (the stack_mode constant).
enum stack_mode {
	SM_FP = 0,    // frame-pointer walk in BPF (bpf_get_stackid)
	SM_DWARF = 1, // copy registers and stack for every sampled allocation
	SM_AUTO = 2,  // copy for the processes in dwarf_procs, walk frame pointers for the rest
	// CFI walk in BPF (unwind.h), stacks interned in uw_stacks; copies where the
	// walk meets code not described yet
	SM_CFI = 3,
};

// A sampled allocation's registers and top of its user stack, taken at the
// allocator's return, for unwinding with the objects' CFI in userspace.
struct stack_event {
	__u32 type;
	__u32 tgid;
	__u32 seq;  // the live block's stack_id without the STACK_DWARF flag
	__u32 len;  // bytes of data copied from sp
	__u64 size; // block size
	__u64 ip, sp, bp;
	__u8 data[STACK_COPY];
};

struct oom_event {
	__u32 type;
	__u32 pid; // victim (thread group id)
	__u64 ts;
	__u64 total_vm;	     // pages
	__u64 anon_rss;	     // KiB
	__u64 file_rss;	     // KiB
	__u64 shmem_rss;     // KiB
	__u64 memcg;	     // victim's memory cgroup id (0: unknown, classic tracepoint)
	__u64 cgroup;	     // victim's cgroup v2 id (0: unknown)
	__u64 trigger_memcg; // memory cgroup of the task whose allocation triggered the OOM
	__u32 trigger_pid;
	__s16 oom_score_adj;
	__u8 have_rss;
	__u8 have_score;
	char comm[16];
};

#endif
