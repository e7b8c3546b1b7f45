package bpfload

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"

	mbpf "github.com/memprof/memprof/bpf"
)

// Counters are the BPF side's event counts summed over CPUs.
type Counters struct {
	Calls, Frees, Samples uint64
	StackCopies           uint64 // sampled stacks copied for userspace unwinding
	Nested                uint64 // calls inside another allocator call, left to the outer one
	TailCalls             uint64 // jumps from an allocator function to another that returns for it
	// Lost events by cause. MissedReturn counts allocator calls abandoned
	// without a return (longjmp or an exception out of the allocator, a
	// lost probe), recognised at the thread's next allocator call.
	MissedReturn, NoThreadState, LiveFull, AllocsFull,
	StackCollision, StackLost, ReadFailed, EventsLost uint64
	// ForwardUnseen counts, among the MissedReturn calls, the calls of an
	// operator new probed at its entry only (it forwards to malloc, whose
	// return records the block) in which no allocator call was seen: malloc
	// resolved to an object memprof does not probe, or new threw first.
	ForwardUnseen uint64
}

// Loss is one cause of lost events and its count.
type Loss struct {
	Cause string
	Count uint64
}

// Losses lists every cause of lost events with its count, zero or not, in
// a fixed order (for metrics, where each cause is a series).
func (c Counters) Losses() []Loss {
	return []Loss{
		{"abandoned_call", c.MissedReturn},
		{"no_thread_state", c.NoThreadState},
		{"live_map_full", c.LiveFull},
		{"alloc_map_full", c.AllocsFull},
		{"stack_collision", c.StackCollision},
		{"stack_walk_failed", c.StackLost},
		{"user_read_failed", c.ReadFailed},
		{"ringbuf_full", c.EventsLost},
		{"forward_unseen", c.ForwardUnseen},
	}
}

// Lost lists the non-zero loss causes with their counts, for summaries and
// profile comments. Nothing the BPF side drops goes unreported.
func (c Counters) Lost() map[string]uint64 {
	m := map[string]uint64{}
	for _, l := range c.Losses() {
		if l.Count > 0 {
			m[l.Cause] = l.Count
		}
	}
	return m
}

// ReadCounters sums the per-CPU counters.
func (o *Objects) ReadCounters() (Counters, error) {
	var c Counters
	get := func(idx mbpf.MemprofCounter) (uint64, error) {
		var per []uint64
		if err := o.Counters.Lookup(uint32(idx), &per); err != nil {
			return 0, fmt.Errorf("read BPF counter %d: %w", idx, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		return sum, nil
	}
	fields := []struct {
		idx mbpf.MemprofCounter
		dst *uint64
	}{
		{mbpf.MemprofCounterC_CALLS, &c.Calls},
		{mbpf.MemprofCounterC_FREES, &c.Frees},
		{mbpf.MemprofCounterC_SAMPLES, &c.Samples},
		{mbpf.MemprofCounterC_NESTED, &c.Nested},
		{mbpf.MemprofCounterC_MISSED_RETURN, &c.MissedReturn},
		{mbpf.MemprofCounterC_NO_THREAD_STATE, &c.NoThreadState},
		{mbpf.MemprofCounterC_LIVE_FULL, &c.LiveFull},
		{mbpf.MemprofCounterC_ALLOCS_FULL, &c.AllocsFull},
		{mbpf.MemprofCounterC_STACK_COLLISION, &c.StackCollision},
		{mbpf.MemprofCounterC_STACK_LOST, &c.StackLost},
		{mbpf.MemprofCounterC_READ_FAILED, &c.ReadFailed},
		{mbpf.MemprofCounterC_EVENTS_LOST, &c.EventsLost},
		{mbpf.MemprofCounterC_STACK_COPIES, &c.StackCopies},
		{mbpf.MemprofCounterC_TAIL_CALLS, &c.TailCalls},
		{mbpf.MemprofCounterC_FORWARD_UNSEEN, &c.ForwardUnseen},
	}
	for _, f := range fields {
		v, err := get(f.idx)
		if err != nil {
			return c, err
		}
		*f.dst = v
	}
	return c, nil
}

// Capability numbers (linux/capability.h).
const (
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// checkCaps names the capabilities a non-root memprof lacks.
func checkCaps() error {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return fmt.Errorf("read own capabilities: %w", err)
	}
	var eff uint64
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			eff, _ = strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	var missing []string
	for _, c := range []struct {
		bit  uint
		name string
	}{{capBPF, "CAP_BPF"}, {capPerfmon, "CAP_PERFMON"}, {capSysAdmin, "CAP_SYS_ADMIN"}} {
		if eff&(1<<c.bit) == 0 {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("memprof needs root or the capabilities %s (missing: %s): BPF programs, uprobes on other processes and reading their memory maps require them", "CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN", strings.Join(missing, ", "))
	}
	return nil
}

// ProcCalls returns the allocator calls counted per process (probe hits).
// Threads add their count every few thousand calls and at each sample, so
// the figure trails the truth by at most CALLS_FLUSH calls per thread.
func (o *Objects) ProcCalls() (map[uint32]uint64, error) {
	out := map[uint32]uint64{}
	// Batched where the kernel can: one system call per 1024 processes
	// instead of two per process (the agent reads it every collection).
	keys := make([]uint32, 1024)
	vals := make([]uint64, 1024)
	var cur ebpf.MapBatchCursor
	for {
		n, err := o.MemprofObjects.ProcCalls.BatchLookup(&cur, keys, vals, nil)
		for i := 0; i < n; i++ {
			out[keys[i]] = vals[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			if len(out) == 0 && errors.Is(err, ebpf.ErrNotSupported) {
				break
			}
			return nil, fmt.Errorf("read per-process call counts: %w", err)
		}
	}
	var k uint32
	var v uint64
	it := o.MemprofObjects.ProcCalls.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read per-process call counts: %w", err)
	}
	return out, nil
}

// ForgetProc drops a process's call count (after it exited). A pid with no
// count is not an error; any other failure leaves the entry taking a slot of
// proc_calls and is returned for the caller to report.
func (o *Objects) ForgetProc(pid uint32) error {
	if err := o.MemprofObjects.ProcCalls.Delete(pid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forget call count of pid %d: %w", pid, err)
	}
	return nil
}

// MapStat is the occupancy of one BPF map.
type MapStat struct {
	Name              string
	Entries, Capacity int
}

// MapStats counts the entries of the maps whose capacity bounds what
// memprof can record (live blocks, allocation buckets, stacks, per-process
// call counts). It walks their keys: call it at metrics-scrape frequency,
// not per event.
func (o *Objects) MapStats() []MapStat {
	var out []MapStat
	for _, m := range []struct {
		name string
		m    *ebpf.Map
	}{
		{"allocs", o.Allocs}, {"live", o.Live}, {"proc_calls", o.MemprofObjects.ProcCalls}, {"stacks", o.Stacks},
		{"uw_stacks", o.UwStacks},
	} {
		out = append(out, MapStat{Name: m.name, Entries: countKeys(m.m), Capacity: int(m.m.MaxEntries())})
	}
	return out
}

func countKeys(m *ebpf.Map) int {
	cur := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	if err := m.NextKey(nil, next); err != nil {
		return 0
	}
	n := 0
	for {
		n++
		copy(cur, next)
		if err := m.NextKey(cur, next); err != nil || n > 2*int(m.MaxEntries()) {
			return n
		}
	}
}
