// Package bpfload checks that the kernel can run memprof, loads the BPF
// programs of package bpf with the session's settings, and reads their
// counters and events.
package bpfload

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/unwindtable"
)

// GapTableSize is the number of entries of the BPF gap table.
const GapTableSize = int(mbpf.MemprofBoundsGAP_TABLE_SIZE)

// Options are the load-time settings.
type Options struct {
	SampleRate uint64 // mean bytes between samples; 1 = every allocation
	// StackMode: mbpf.MemprofStackModeSM_CFI (CFI walk in BPF from the
	// tables of Objects.Unwind), SM_FP (frame pointers in BPF), SM_DWARF
	// (copy every sampled stack for userspace unwinding) or SM_AUTO (copy
	// for the processes put in the DwarfProcs map).
	StackMode mbpf.MemprofStackMode
	// UnwindRows is the capacity of uw_rows in SM_CFI mode, the memory
	// bound of all unwind tables (8 bytes a row; 0: DefaultUnwindRows).
	UnwindRows uint32
	// UnwindStacks is the capacity of uw_stacks in SM_CFI mode: distinct
	// stacks kept at once (~1 KiB each, allocated as used; 0:
	// DefaultUnwindStacks).
	UnwindStacks uint32
	// ClassicOOM uses the classic oom/mark_victim tracepoint (pid only, the
	// path of kernels before 6.8) even where the BTF-typed one exists.
	ClassicOOM bool
	// NoSession uses entry and return uprobes even where session uprobes
	// exist (the path of kernels before 6.13).
	NoSession bool
	// Tables, in SM_CFI mode, are another tier's unwind tables to walk
	// with (its Store and maps; nil: the heap tier's own). UnwindRows is
	// then that tier's.
	Tables *unwindtable.Shared
	// EventsBytes sizes the ring buffer of OOM events and stack copies
	// (a power of two, at least a page; 0: the object's 16 MiB). Its
	// pages are mapped twice into memprof's address space, so its RSS
	// counts it twice.
	EventsBytes uint32
}

// Defaults of Options.UnwindRows (32 MiB of tables) and UnwindStacks.
const (
	DefaultUnwindRows   = 1 << 22
	DefaultUnwindStacks = 1 << 16
)

// Objects are the loaded programs and maps.
type Objects struct {
	mbpf.MemprofObjects
	Features Features
	// Unwind keeps the unwind tables of the targets' objects in the uw_*
	// maps (SM_CFI mode; nil otherwise). One store for every tier: a tier
	// loaded as another collection shares it by loading with
	// UnwindReplacements.
	Unwind   *unwindtable.Store
	oomLinks []link.Link
}

// UnwindMaps are the uw_* maps the Store manages.
func (o *Objects) UnwindMaps() unwindtable.Maps {
	return unwindtable.Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules, Stale: o.UwStale}
}

// UnwindReplacements are the maps of bpf/unwind.h by name, for
// ebpf.CollectionOptions.MapReplacements of another collection that
// includes unwind.h: its walks then use the same tables, stacks and
// counters.
func (o *Objects) UnwindReplacements() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"uw_procs": o.UwProcs, "uw_objects": o.UwObjects, "uw_rows": o.UwRows, "uw_rules": o.UwRules,
		"uw_stale": o.UwStale, "uw_stats": o.UwStats, "uw_stacks": o.UwStacks, "uw_intern_stats": o.UwInternStats,
		"uw_scratch": o.UwScratch,
	}
}

// UnwindTables are the store and its table maps (CFI mode; nil otherwise)
// for another tier's collection to walk with (the RSS tier): unlike
// UnwindReplacements, its stacks and counters stay its own.
func (o *Objects) UnwindTables() *unwindtable.Shared {
	if o.Unwind == nil {
		return nil
	}
	return &unwindtable.Shared{Store: o.Unwind, Maps: map[string]*ebpf.Map{
		"uw_procs": o.UwProcs, "uw_objects": o.UwObjects, "uw_rows": o.UwRows, "uw_rules": o.UwRules,
		"uw_stale": o.UwStale, "uw_scratch": o.UwScratch,
	}}
}

// Features says which kernel paths are in use.
type Features struct {
	Kernel        string
	RingBuffer    bool
	UprobeMulti   bool
	UprobeSession bool // uprobe.session (6.13+): the return probe only for calls that need it
	OOMTaskBTF    bool // tp_btf/mark_victim with the victim's task (6.8+)
}

func (f Features) String() string {
	s := fmt.Sprintf("kernel %s; PID-filtered uprobes", f.Kernel)
	if f.UprobeSession {
		s += " via uprobe session links (one per object and process; return probes only for sampled calls)"
	} else if f.UprobeMulti {
		s += " via uprobe_multi links (one per object and process)"
	} else {
		s += " via one perf event per probe (no uprobe_multi before Linux 6.6)"
	}
	if f.OOMTaskBTF {
		s += "; OOM victims via tp_btf/mark_victim"
	} else {
		s += "; OOM victims via tracepoint oom/mark_victim (pid only, cgroups from /proc)"
	}
	return s
}

// Check verifies the prerequisites and says exactly what is missing.
func Check() error {
	if os.Geteuid() != 0 {
		if err := checkCaps(); err != nil {
			return err
		}
	}
	if _, err := btf.LoadKernelSpec(); err != nil {
		return fmt.Errorf("kernel BTF not available (%w): memprof needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (/sys/kernel/btf/vmlinux), Linux 5.15 or newer", err)
	}
	if _, err := os.Stat("/sys/bus/event_source/devices/uprobe"); err != nil {
		return fmt.Errorf("uprobes not available (no /sys/bus/event_source/devices/uprobe): the kernel needs CONFIG_UPROBE_EVENTS=y")
	}
	return nil
}

// Load loads the programs with the session's sample rate.
func Load(opts Options) (*Objects, error) {
	if err := Check(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raise RLIMIT_MEMLOCK: %w (needs CAP_SYS_RESOURCE on kernels before 5.11)", err)
	}
	spec, err := mbpf.LoadMemprof()
	if err != nil {
		return nil, fmt.Errorf("read embedded BPF object: %w", err)
	}
	if opts.SampleRate <= 1 {
		if err := spec.Variables["sample_all"].Set(uint32(1)); err != nil {
			return nil, err
		}
	}
	if err := spec.Variables["stack_mode"].Set(uint32(opts.StackMode)); err != nil {
		return nil, err
	}
	// The unwind tables' arrays are preallocated: sized for the CFI walk,
	// one entry otherwise (then the walk is never run).
	rows, nstacks := uint32(1), uint32(1)
	if opts.StackMode != mbpf.MemprofStackModeSM_CFI {
		spec.Maps["uw_objects"].MaxEntries = 1
		spec.Maps["uw_rules"].MaxEntries = 1
	}
	if opts.StackMode == mbpf.MemprofStackModeSM_CFI {
		rows, nstacks = opts.UnwindRows, opts.UnwindStacks
		if rows == 0 {
			rows = DefaultUnwindRows
		}
		if nstacks == 0 {
			nstacks = DefaultUnwindStacks
		}
	}
	spec.Maps["uw_rows"].MaxEntries = rows
	spec.Maps["uw_stacks"].MaxEntries = nstacks
	var copts *ebpf.CollectionOptions
	if opts.StackMode == mbpf.MemprofStackModeSM_CFI && opts.Tables != nil {
		// The other tier's tables replace these maps (sizes must agree).
		for name, m := range opts.Tables.Maps {
			if ms := spec.Maps[name]; ms != nil {
				ms.MaxEntries = m.MaxEntries()
			}
		}
		copts = &ebpf.CollectionOptions{MapReplacements: opts.Tables.Maps}
	}
	if n := opts.EventsBytes; n != 0 {
		if n < uint32(os.Getpagesize()) || n&(n-1) != 0 {
			return nil, fmt.Errorf("events ring buffer of %d bytes: want a power of two of at least a page", n)
		}
		spec.Maps["events"].MaxEntries = n
	}
	feats := detect()
	if opts.ClassicOOM {
		feats.OOMTaskBTF = false
	}
	if opts.NoSession {
		feats.UprobeSession = false
	}
	// Programs this kernel cannot load get a copy of a uprobe program in
	// their slot (so the generated object struct can be assigned); they are
	// closed right after loading. Only one of the two OOM programs loads on
	// a given kernel; the uprobe_multi ones need 6.6+.
	unused := []string{"oom_mark_victim_btf"}
	if feats.OOMTaskBTF {
		unused = []string{"oom_mark_victim"}
	}
	if !feats.UprobeMulti {
		unused = append(unused, "enter_multi", "return_multi")
	}
	if !feats.UprobeSession {
		unused = append(unused, "alloc_session")
	}
	for _, name := range unused {
		placeholder := spec.Programs["tail_site"].Copy()
		placeholder.Name = name
		spec.Programs[name] = placeholder
	}
	o := &Objects{Features: feats}
	if err := spec.LoadAndAssign(&o.MemprofObjects, copts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			// %+v of the VerifierError is the whole log, not only its end.
			return nil, fmt.Errorf("the kernel's verifier rejected memprof's BPF programs: %w\n%s", err, fmt.Sprintf("%+v", ve))
		}
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("load BPF programs: %w: run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN", err)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	closeUnused := func(p **ebpf.Program) {
		(*p).Close()
		*p = nil
	}
	if feats.OOMTaskBTF {
		closeUnused(&o.OomMarkVictim)
	} else {
		closeUnused(&o.OomMarkVictimBtf)
	}
	if !feats.UprobeMulti {
		closeUnused(&o.EnterMulti)
		closeUnused(&o.ReturnMulti)
	}
	if !feats.UprobeSession {
		closeUnused(&o.AllocSession)
	}
	if err := o.SetRate(opts.SampleRate); err != nil {
		o.Close()
		return nil, err
	}
	if opts.StackMode == mbpf.MemprofStackModeSM_CFI {
		if opts.Tables != nil {
			o.Unwind = opts.Tables.Store
		} else {
			o.Unwind = unwindtable.NewStore(o.UnwindMaps(), 0, 2)
		}
	}
	return o, nil
}

// Detect reports which kernel paths this kernel offers.
func Detect() Features { return detect() }

func detect() Features {
	f := Features{Kernel: kernelRelease(), RingBuffer: features.HaveMapType(ebpf.RingBuf) == nil}
	f.UprobeMulti = features.HaveProgramType(ebpf.Kprobe) == nil && haveUprobeMulti()
	f.UprobeSession = f.UprobeMulti && kernelAtLeast(6, 13) && haveKfunc("bpf_session_is_return")
	if spec, err := btf.LoadKernelSpec(); err == nil {
		var fn *btf.Typedef
		if err := spec.TypeByName("btf_trace_mark_victim", &fn); err == nil {
			if ptr, ok := fn.Type.(*btf.Pointer); ok {
				if proto, ok := ptr.Target.(*btf.FuncProto); ok && len(proto.Params) >= 2 {
					if p, ok := proto.Params[1].Type.(*btf.Pointer); ok {
						if s, ok := p.Target.(*btf.Struct); ok && s.Name == "task_struct" {
							f.OOMTaskBTF = true
						}
					}
				}
			}
		}
	}
	return f
}

// haveKfunc reports whether the kernel's BTF has the kfunc name.
func haveKfunc(name string) bool {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return false
	}
	var fn *btf.Func
	return spec.TypeByName(name, &fn) == nil
}

// kernelAtLeast compares the running kernel's release with major.minor.
func kernelAtLeast(major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(kernelRelease(), "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

func haveUprobeMulti() bool {
	return features.HaveBPFLinkUprobeMulti() == nil
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "unknown"
	}
	return string(trimNL(b))
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// SetRate fills the table of exponential gaps for a mean of rate bytes:
// stratified quantiles of Exp(rate), one picked at random after each sample,
// so gaps follow the exponential distribution and sampling is a Poisson
// process over allocated bytes.
func (o *Objects) SetRate(rate uint64) error {
	keys := make([]uint32, GapTableSize)
	vals := make([]uint64, GapTableSize)
	for i := range keys {
		keys[i] = uint32(i)
		if rate > 1 {
			u := (float64(i) + 0.5) / float64(GapTableSize)
			vals[i] = uint64(math.Round(-math.Log(1-u) * float64(rate)))
		}
	}
	rand.Shuffle(len(vals), func(i, j int) { vals[i], vals[j] = vals[j], vals[i] })
	if _, err := o.Gaps.BatchUpdate(keys, vals, nil); err != nil {
		for i := range keys {
			if err := o.Gaps.Update(keys[i], vals[i], ebpf.UpdateAny); err != nil {
				return fmt.Errorf("fill sampling gap table: %w", err)
			}
		}
	}
	return nil
}

// Programs returns the programs to attach to allocator functions.
func (o *Objects) Programs() attach.Programs {
	return attach.Programs{
		Enter: map[attach.Kind]*ebpf.Program{
			attach.Malloc:        o.MallocEnter,
			attach.Calloc:        o.CallocEnter,
			attach.Memalign:      o.MemalignEnter,
			attach.PosixMemalign: o.PosixMemalignEnter,
			attach.Realloc:       o.ReallocEnter,
			attach.Reallocarray:  o.ReallocarrayEnter,
			attach.Xallocx:       o.XallocxEnter,
			attach.Free:          o.FreeEnter,
		},
		Return:      o.AllocReturn,
		RetSite:     o.RetSite,
		TailSite:    o.TailSite,
		Multi:       o.EnterMulti,
		MultiReturn: o.ReturnMulti,
		Session:     o.AllocSession,
	}
}

// AttachOOM attaches the OOM program (host-wide: it fires once per OOM
// kill): the BTF-typed one where the kernel passes the victim's task, else
// the classic tracepoint, mounting tracefs if nothing has.
func (o *Objects) AttachOOM() error {
	if o.OomMarkVictimBtf != nil {
		l, err := link.AttachTracing(link.TracingOptions{Program: o.OomMarkVictimBtf})
		if err != nil {
			return fmt.Errorf("attach tp_btf/mark_victim: %w", err)
		}
		o.oomLinks = append(o.oomLinks, l)
		return nil
	}
	// cilium/ebpf looks tracefs up once per process: mount it before.
	if _, err := os.Stat("/sys/kernel/tracing/events"); err != nil {
		if _, err := os.Stat("/sys/kernel/debug/tracing/events"); err != nil {
			if err := mountTracefs(); err != nil {
				return fmt.Errorf("the classic oom:mark_victim tracepoint needs tracefs, and mounting it at /sys/kernel/tracing failed: %w", err)
			}
		}
	}
	l, err := link.Tracepoint("oom", "mark_victim", o.OomMarkVictim, nil)
	if err != nil {
		return fmt.Errorf("attach tracepoint oom:mark_victim: %w (mount tracefs at /sys/kernel/tracing)", err)
	}
	o.oomLinks = append(o.oomLinks, l)
	return nil
}

func mountTracefs() error {
	return unix.Mount("tracefs", "/sys/kernel/tracing", "tracefs", 0, "")
}

// Close detaches the OOM programs and frees the maps and programs.
func (o *Objects) Close() error {
	for _, l := range o.oomLinks {
		l.Close()
	}
	return o.MemprofObjects.Close()
}
