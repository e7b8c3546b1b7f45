// SPDX-License-Identifier: GPL-2.0
// Types shared by memprof.bpf.c and, through bpf2go, the Go loader.
#ifndef MEMPROF_H
#define MEMPROF_H

#define GAP_TABLE_SIZE 4096	 // power of two
#define MAX_LIVE 262144		 // sampled live blocks across all targets
#define MAX_ALLOC_BUCKETS 65536	 // (process, stack, size) buckets
#define MAX_STACKS 32768
#define MAX_PROCS 16384		 // processes with a call count
#define MAX_STACK_DEPTH 127
#define STACK_UNKNOWN 0xffffffff

#ifndef EEXIST
#define EEXIST 17
#endif

// Allocator function kinds: the probe's cookie with uprobe_multi. Same
// numbering as Go's attach.Kind.
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

#define P_KIND_MASK 0xff
#define P_WRAPPER 0x100	// cookie flag: the function calls other allocator entry points

// Pending call kinds.
enum call_kind {
	K_PTR = 1,	// returns the block (malloc, calloc, new, memalign, ...)
	K_MEMPTR = 2,	// posix_memalign: returns 0, block stored through ptr
	K_REALLOC = 3,	// realloc, reallocarray, rallocx: ptr is the old block
	K_XALLOCX = 4,	// jemalloc xallocx: resizes ptr in place, returns size
};

// Counter indexes (see internal/memprof for their names).
enum counter {
	C_CALLS = 0,		// allocating calls seen
	C_FREES,		// free-like calls seen
	C_SAMPLES,		// sampled allocations tracked
	C_NESTED,		// calls nested in another allocator call (left to the outer)
	C_MISSED_RETURN,	// pending calls whose return probe never fired
	C_NO_THREAD_STATE,	// task storage unavailable: call lost
	C_LIVE_FULL,		// live map full: sampled block lost
	C_ALLOCS_FULL,		// alloc bucket map full: sample's alloc count lost
	C_STACK_COLLISION,	// stack map hash collision: stack lost
	C_STACK_LOST,		// other stack walk failure
	C_READ_FAILED,		// user memory read failed (posix_memalign result)
	C_EVENTS_LOST,		// ring buffer full (OOM event, or a stack copy: then the frame-pointer stack is used)
	C_STACK_COPIES,		// stacks copied for userspace unwinding
	NR_COUNTERS,
};

struct pending {
	__u64 sp;	// stack pointer at entry: identifies the call at return
	__u64 size;
	__u64 ptr;	// old block (realloc) or result slot (posix_memalign)
	__u8 kind;
	__u8 sampled;
	__u8 _pad[6];
};

#define CALLS_FLUSH 4096	// per-thread calls counted before they are added to the process's count

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
	__u32 stack_id;
	__u32 _pad;
};

struct alloc_key {
	__u32 tgid;
	__u32 stack_id;
	__u64 size;
};

enum event_type {
	EV_OOM = 1,
	EV_STACK = 2,
};

#define STACK_COPY 8192		// bytes of user stack copied for userspace unwinding (perf's default for --call-graph dwarf)
#define STACK_DWARF 0x80000000		// stack_id flag: a sequence number of a stack_event

// Stack modes (the stack_mode constant).
enum stack_mode {
	SM_FP = 0,	// frame-pointer walk in BPF (bpf_get_stackid)
	SM_DWARF = 1,	// copy registers and stack for every sampled allocation
	SM_AUTO = 2,	// copy for the processes in dwarf_procs, walk frame pointers for the rest
};

// A sampled allocation's registers and top of its user stack, taken at the
// allocator's return, for unwinding with the objects' CFI in userspace.
struct stack_event {
	__u32 type;
	__u32 tgid;
	__u32 seq;	// the live block's stack_id without the STACK_DWARF flag
	__u32 len;	// bytes of data copied from sp
	__u64 size;	// block size
	__u64 ip, sp, bp;
	__u8 data[STACK_COPY];
};

struct oom_event {
	__u32 type;
	__u32 pid;		// victim (thread group id)
	__u64 ts;
	__u64 total_vm;		// pages
	__u64 anon_rss;		// KiB
	__u64 file_rss;		// KiB
	__u64 shmem_rss;	// KiB
	__u64 memcg;		// victim's memory cgroup id (0: unknown, classic tracepoint)
	__u64 cgroup;		// victim's cgroup v2 id (0: unknown)
	__u64 trigger_memcg;	// memory cgroup of the task whose allocation triggered the OOM
	__u32 trigger_pid;
	__s16 oom_score_adj;
	__u8 have_rss;
	__u8 have_score;
	char comm[16];
};

#endif
