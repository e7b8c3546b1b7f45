// SPDX-License-Identifier: GPL-2.0
// Types of the process and cgroup events (procevents.bpf.c), shared through
// bpf2go with the Go reader (internal/procwatch).
#ifndef MEMPROF_PROCEVENTS_H
#define MEMPROF_PROCEVENTS_H

// Kinds of pw_event.
enum pw_event_kind {
	PE_FORK = 1,	  // a new process (not a thread): pid/tgid the child, ppid the parent
	PE_EXEC,	  // a process replaced its program
	PE_EXIT,	  // the last thread of a process exited
	PE_CGROUP_MKDIR,  // a cgroup was created (memory v1 hierarchy or v2)
	PE_CGROUP_RMDIR,  // a cgroup was removed
	PE_CGROUP_ATTACH, // a process (its leader) was moved into a cgroup
};

// pw_event is one event of the events ring buffer. memcg is the kernfs id
// (inode number) of the memory controller's cgroup (v1 memory hierarchy on
// hybrid hosts), cgroup the v2 (default hierarchy) cgroup id: of the task
// for process events, of the cgroup itself for cgroup events (the other one
// is 0).
struct pw_event {
	__u64 memcg;
	__u64 cgroup;
	__u64 start; // the task's start, ns since boot (CLOCK_BOOTTIME); 0 for mkdir/rmdir
	__u64 ts;    // when the event happened, ns of CLOCK_BOOTTIME
	__u32 kind;  // enum pw_event_kind
	__u32 pid;   // the task (exec: after it became the leader; exit: the process, = tgid)
	__u32 tgid;  // its process
	__u32 ppid;  // fork: the parent process (tgid)
	__u32 ptid;  // fork: the forking thread
	__u32 level; // cgroup events: the cgroup's depth (root 0)
};

#define PW_PATH_LEN 256

// pw_cgroup_event is a cgroup mkdir or rmdir: the event and the cgroup's
// path in its hierarchy, as the tracepoint gives it ("/kubepods/..."),
// NUL-terminated, cut to PW_PATH_LEN - 1 bytes.
struct pw_cgroup_event {
	struct pw_event e;
	char path[PW_PATH_LEN];
};

#endif
