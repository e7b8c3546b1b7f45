// Package unwindtable derives the compact unwind tables that memprof's BPF
// unwinder (bpf/unwind.h) evaluates from the call-frame information
// internal/unwind parses, and keeps them in BPF maps: one shared array of
// rows holding every object's table at its own offset, a deduplicated array
// of rules the rows point to, an array of objects (row range per table id),
// and a per-process list of executable mappings (pc range -> table id,
// bias).
//
// The approach is that of Parca Agent and the OpenTelemetry eBPF profiler
// (sorted pc -> rule rows searched in BPF, per-process mappings maintained
// from userspace); the layout and the verifier strategy (one global
// function per frame instead of tail calls) are memprof's own.
//
// How a tier uses it:
//
// BPF: include "unwind.h" and, where the tier samples, walk from the user
// registers and copy the frames before releasing the state:
//
//	struct uw_state *w = uw_walk(tgid, PT_REGS_IP(ctx), PT_REGS_SP(ctx), PT_REGS_FP(ctx));
//	__u64 stack_id = 0; // 0: no stack (counted in uw_stats or uw_intern_stats)
//	if (w) {
//		stack_id = uw_intern(w); // w->stack: pcs[0..n), status (UW_COMPLETE or why truncated)
//		uw_release(w);
//	}
//
// and key its aggregation maps by stack_id; userspace reads the frames with
// ReadStack (uw_stacks) and deletes stacks nothing refers to any more.
//
// In a uprobe or uretprobe ctx is the probe's pt_regs; elsewhere in the
// sampled thread's context (a tracepoint or kprobe) the user registers are
// bpf_task_pt_regs(bpf_get_current_task_btf()).
//
// Go: one Store for all tiers, over the uw_* maps of the first collection
// loaded; later collections that include unwind.h reuse its tables through
// ebpf.CollectionOptions.MapReplacements with the maps of a Shared
// (uw_procs, uw_objects, uw_rows, uw_rules, uw_stale, uw_scratch; each tier
// keeps its own uw_stacks, which it prunes, and counters). Size uw_rows (8
// bytes a row: the memory bound of all tables) with MapSpec.MaxEntries
// before loading. Each tier gives its processes to the Store through its
// own Targets (Add when a target is added, Remove when it exits): the Store
// rescans the processes whose walks met code mapped later (dlopen) for the
// tiers holding them, backing off a process whose rescans find nothing new
// (a corrupt stack; RescanBackoffMax), and offers unknown ones to the tiers
// (adopt). Report Stats (the rescan counts among them), Tables,
// ReadWalkStats and ReadInternStats.
// Prepare builds the table of a file before any process maps it (a command
// stopped at its exec: the libraries ld.so will map) and WaitFor bounds the
// wait for the builds. The heap tier (internal/recorder, --stack-mode cfi)
// gets its Store from bpfload.Objects.Unwind; another collection shares it
// by loading with bpfload.Objects.UnwindReplacements (uw_scratch included).
package unwindtable
