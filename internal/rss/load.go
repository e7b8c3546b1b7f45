// Package rss is memprof's RSS tier: which stacks made each process's
// anonymous memory resident. It loads bpf/rss.bpf.c (page-fault and
// rss_stat tracepoints: a fault of a target that added an anonymous page),
// filters targets by pid,
// v1 memory cgroup or v2 cgroup in BPF, samples faulted bytes (Poisson),
// keeps the sampled folios by (process, address), and at snapshot time
// checks them against /proc/PID/pagemap, so that memory given back in any
// way leaves the profile. No uprobe is involved: the allocator is never
// touched.
package rss

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/unwindtable"
)

// GapTableSize mirrors RSS_GAP_TABLE_SIZE in bpf/rss.h.
const GapTableSize = 4096

// The tracepoint whose BTF-typed form confirms new anonymous pages: it has
// passed the mm since Linux 6.2 and fires on every counter change there.
const counterHook = "btf_trace_rss_stat"

// objects are the loaded RSS programs and maps with their links.
type objects struct {
	mbpf.RssObjects
	links []link.Link
	oom   bool // the OOM program is attached
	// store holds the unwind tables the CFI walks use (nil in
	// frame-pointer mode): another tier's (loadOptions.Unwind) or the RSS
	// tier's own, over its uw_* maps.
	store *unwindtable.Store
}

// loadOptions are the load-time settings.
type loadOptions struct {
	SampleRate    uint64 // mean bytes between sampled faults; 1 = every fault
	FramePointers bool   // frame-pointer walks (bpf_get_stackid) rather than CFI walks (uw_walk)
	// Unwind, in CFI mode, are another tier's unwind tables to walk with
	// (nil: the RSS tier builds its own).
	Unwind   *unwindtable.Shared
	NoAttach bool // load only (tests of the maps)
}

// rssUnwindStacks is the capacity of the RSS tier's uw_stacks (distinct
// stacks of sampled faults kept at once, ~1 KiB each, allocated as used;
// as RSS_MAX_STACKS of the frame-pointer mode's stack map).
const rssUnwindStacks = 16384

// Supported reports whether this kernel has what the RSS tier needs, with
// an error saying what is missing.
func Supported() error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("kernel BTF not available (%w): the RSS tier needs CONFIG_DEBUG_INFO_BTF=y", err)
	}
	var td *btf.Typedef
	if err := spec.TypeByName(counterHook, &td); err != nil {
		return fmt.Errorf("tracepoint kmem:rss_stat not found in the kernel's BTF: the RSS tier needs Linux 6.2 or newer")
	}
	return nil
}

func load(opts loadOptions) (*objects, error) {
	if err := Supported(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raise RLIMIT_MEMLOCK: %w", err)
	}
	spec, err := mbpf.LoadRss()
	if err != nil {
		return nil, fmt.Errorf("read embedded RSS BPF object: %w", err)
	}
	if opts.SampleRate <= 1 {
		if err := spec.Variables["rss_sample_all"].Set(uint32(1)); err != nil {
			return nil, err
		}
	}
	mode := mbpf.RssRssStackModeRSM_CFI
	if opts.FramePointers {
		mode = mbpf.RssRssStackModeRSM_FP
	}
	if err := spec.Variables["rss_stack_mode"].Set(uint32(mode)); err != nil {
		return nil, err
	}
	// Only the stack maps of the mode in use get their size (the arrays
	// and the stack trace map are preallocated); the others one entry.
	var copts *ebpf.CollectionOptions
	if opts.FramePointers {
		for _, m := range []string{"uw_objects", "uw_rules", "uw_rows", "uw_stacks"} {
			spec.Maps[m].MaxEntries = 1
		}
	} else {
		spec.Maps["rss_stacks"].MaxEntries = 1
		spec.Maps["uw_stacks"].MaxEntries = rssUnwindStacks
		spec.Maps["uw_rows"].MaxEntries = bpfload.DefaultUnwindRows
		if opts.Unwind != nil {
			// The other tier's tables: its maps replace these (their
			// sizes must agree).
			for name, m := range opts.Unwind.Maps {
				if ms := spec.Maps[name]; ms != nil {
					ms.MaxEntries = m.MaxEntries()
				}
			}
			copts = &ebpf.CollectionOptions{MapReplacements: opts.Unwind.Maps}
		}
	}
	if err := spec.Variables["rss_thp_mode"].Set(uint32(thpMode())); err != nil {
		return nil, err
	}
	o := &objects{}
	if err := spec.LoadAndAssign(&o.RssObjects, copts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			// %+v of the VerifierError is the whole log, not only its end.
			return nil, fmt.Errorf("the kernel's verifier rejected memprof's RSS programs: %w\n%s", err, fmt.Sprintf("%+v", ve))
		}
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("load RSS BPF programs: %w: run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN", err)
		}
		return nil, fmt.Errorf("load RSS BPF programs: %w", err)
	}
	if err := setRate(o.RssGaps, opts.SampleRate); err != nil {
		o.close()
		return nil, err
	}
	if !opts.FramePointers {
		if opts.Unwind != nil {
			o.store = opts.Unwind.Store
		} else {
			o.store = unwindtable.NewStore(unwindtable.Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules, Stale: o.UwStale}, 0, 2)
		}
	}
	if opts.NoAttach {
		return o, nil
	}
	for _, p := range []struct {
		prog *ebpf.Program
		name string
	}{{o.RssFaultUser, "tp_btf/page_fault_user"}, {o.RssFaultKernel, "tp_btf/page_fault_kernel"},
		{o.RssStatHook, "tp_btf/rss_stat"}, {o.RssFork, "tp_btf/sched_process_fork"}} {
		l, err := link.AttachTracing(link.TracingOptions{Program: p.prog})
		if err != nil {
			o.close()
			return nil, fmt.Errorf("attach %s: %w", p.name, err)
		}
		o.links = append(o.links, l)
	}
	// The OOM program needs mark_victim with the victim's task (6.8+);
	// without it OOM kills get no RSS post-mortem (said by OOMSupported).
	if l, err := link.AttachTracing(link.TracingOptions{Program: o.RssOom}); err == nil {
		o.links = append(o.links, l)
		o.oom = true
	}
	return o, nil
}

// thpMode reads the anonymous THP policy, the [bracketed] word of
// /sys/kernel/mm/transparent_hugepage/enabled (never when unreadable).
func thpMode() mbpf.RssRssThpMode {
	b, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil {
		return mbpf.RssRssThpModeTHP_NEVER
	}
	switch {
	case bytes.Contains(b, []byte("[always]")):
		return mbpf.RssRssThpModeTHP_ALWAYS
	case bytes.Contains(b, []byte("[madvise]")):
		return mbpf.RssRssThpModeTHP_MADVISE
	}
	return mbpf.RssRssThpModeTHP_NEVER
}

// setRate fills the table of exponential gaps for a mean of rate bytes:
// stratified quantiles of Exp(rate), shuffled; BPF draws one at random after
// each sample, so sampling is a Poisson process over faulted bytes.
func setRate(m *ebpf.Map, rate uint64) error {
	keys := make([]uint32, GapTableSize)
	vals := make([]uint64, GapTableSize)
	for i := range keys {
		keys[i] = uint32(i)
		if rate > 1 {
			u := (float64(i) + 0.5) / GapTableSize
			vals[i] = max(1, uint64(math.Round(-math.Log(1-u)*float64(rate))))
		}
	}
	rand.Shuffle(len(vals), func(i, j int) { vals[i], vals[j] = vals[j], vals[i] })
	for i := range keys {
		if err := m.Update(keys[i], vals[i], ebpf.UpdateAny); err != nil {
			return fmt.Errorf("fill RSS sampling gap table: %w", err)
		}
	}
	return nil
}

// targetsChanged bumps the target generation after a change of the target
// maps or kinds: every thread's cached verdict (bpf/rss.h, struct
// rss_verdict) is taken again at its next fault. Userspace is the only
// writer (callers hold the session's lock).
func (o *objects) targetsChanged() error {
	var gen uint64
	if err := o.RssTargetGen.Get(&gen); err != nil {
		return fmt.Errorf("read RSS target generation: %w", err)
	}
	if err := o.RssTargetGen.Set(gen + 1); err != nil {
		return fmt.Errorf("bump RSS target generation: %w", err)
	}
	return nil
}

func (o *objects) close() {
	for _, l := range o.links {
		l.Close()
	}
	o.Close()
}

// Counters are the RSS programs' counts summed over CPUs.
type Counters struct {
	Folios, Bytes, Samples uint64
	// Lost by cause.
	PagesFull, BucketsFull, StackCollision, StackLost, EventsLost uint64
}

// Lost lists the non-zero loss causes (names as in profile comments).
func (c Counters) Lost() map[string]uint64 {
	m := map[string]uint64{}
	for k, v := range map[string]uint64{
		"rss_page_map_full":   c.PagesFull,
		"rss_fault_map_full":  c.BucketsFull,
		"rss_stack_collision": c.StackCollision,
		"rss_stack_lost":      c.StackLost,
		"rss_ringbuf_full":    c.EventsLost,
	} {
		if v > 0 {
			m[k] = v
		}
	}
	return m
}

func (o *objects) counters() (Counters, error) {
	var c Counters
	var per []mbpf.RssRssCpu
	if err := o.RssPercpu.Lookup(uint32(0), &per); err != nil {
		return c, fmt.Errorf("read RSS counters: %w", err)
	}
	for _, p := range per {
		for idx, dst := range map[mbpf.RssRssCounter]*uint64{
			mbpf.RssRssCounterRC_FOLIOS:          &c.Folios,
			mbpf.RssRssCounterRC_BYTES:           &c.Bytes,
			mbpf.RssRssCounterRC_SAMPLES:         &c.Samples,
			mbpf.RssRssCounterRC_PAGES_FULL:      &c.PagesFull,
			mbpf.RssRssCounterRC_BUCKETS_FULL:    &c.BucketsFull,
			mbpf.RssRssCounterRC_STACK_COLLISION: &c.StackCollision,
			mbpf.RssRssCounterRC_STACK_LOST:      &c.StackLost,
			mbpf.RssRssCounterRC_EVENTS_LOST:     &c.EventsLost,
		} {
			*dst += p.Counters[idx]
		}
	}
	return c, nil
}
