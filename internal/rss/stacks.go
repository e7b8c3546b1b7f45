package rss

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"
	"unsafe"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/unwind"
)

const (
	stackCopied  = 0x80000000 // RSS_STACK_COPIED
	stackUnknown = 0xffffffff // RSS_STACK_UNKNOWN
	maxFrames    = 127
	// maxUserBuckets bounds the fault counts kept in userspace for copied
	// stacks (one per process, stack and folio size); beyond it faults are
	// counted as lost.
	maxUserBuckets = 1 << 16
)

var stackEventHeader = int(unsafe.Offsetof(mbpf.RssRssStackEvent{}.Data))

// faultKey is one (process, interned stack, folio size) bucket.
type faultKey struct {
	pid   uint32
	stack int // index in stackTable.stacks; -1: unknown
	size  uint64
}

// stackTable interns the stacks of both paths: copied stacks unwound here
// with CFI (by sequence number) and frame-pointer stacks walked in BPF (by
// stack map id).
type stackTable struct {
	mu        sync.Mutex
	cache     *unwind.Cache
	procs     map[int]*unwindProc
	byKey     map[string]int
	stacks    [][]uint64
	truncated []bool
	seqs      map[uint32]int      // copied stack seq -> stack
	bpfIDs    map[uint32]int      // BPF stack map id -> stack
	faults    map[faultKey]uint64 // sampled faults with copied stacks
	full      uint64              // faults lost to maxUserBuckets
	unwound   uint64
	trunc     uint64
}

type unwindProc struct {
	up          *unwind.Process
	lastRefresh time.Time
}

func newStackTable() *stackTable {
	return &stackTable{
		cache:  unwind.NewCache(256 << 20),
		procs:  map[int]*unwindProc{},
		byKey:  map[string]int{},
		seqs:   map[uint32]int{},
		bpfIDs: map[uint32]int{},
		faults: map[faultKey]uint64{},
	}
}

// intern returns the index of the stack pcs (caller holds mu).
func (t *stackTable) intern(pcs []uint64, truncated bool) int {
	b := make([]byte, 0, 8*len(pcs)+1)
	for _, pc := range pcs {
		b = binary.LittleEndian.AppendUint64(b, pc)
	}
	if truncated {
		b = append(b, 't')
	}
	if i, ok := t.byKey[string(b)]; ok {
		return i
	}
	t.byKey[string(b)] = len(t.stacks)
	t.stacks = append(t.stacks, pcs)
	t.truncated = append(t.truncated, truncated)
	return len(t.stacks) - 1
}

// unwinder returns the unwinding view of pid, created from its mappings now
// (or refreshed when force is set and the last refresh is not too recent).
func (t *stackTable) unwinder(pid int, force bool) *unwindProc {
	p := t.procs[pid]
	if p != nil && (!force || time.Since(p.lastRefresh) < 50*time.Millisecond) {
		return p
	}
	maps, err := procmaps.Read(pid)
	if err != nil {
		return p
	}
	if p == nil {
		up, _ := t.cache.Process(pid, maps)
		if up == nil {
			return nil
		}
		p = &unwindProc{up: up}
		t.procs[pid] = p
	} else {
		// As with Process above: objects whose unwind tables cannot be
		// read stay without, and stacks through them end there.
		_ = p.up.Update(maps)
	}
	p.lastRefresh = time.Now()
	return p
}

// handleStack unwinds one rss_stack_event and counts its fault.
func (t *stackTable) handleStack(raw []byte) error {
	if len(raw) < stackEventHeader {
		return fmt.Errorf("short RSS stack event (%d bytes)", len(raw))
	}
	le := binary.LittleEndian
	tgid := int(le.Uint32(raw[4:]))
	seq := le.Uint32(raw[8:])
	n := int(le.Uint32(raw[12:]))
	size := le.Uint64(raw[16:])
	regs := unwind.Regs{IP: le.Uint64(raw[24:]), SP: le.Uint64(raw[32:]), BP: le.Uint64(raw[40:])}
	n = min(n, len(raw)-stackEventHeader)
	data := raw[stackEventHeader : stackEventHeader+n]

	t.mu.Lock()
	defer t.mu.Unlock()
	pcs, truncated := []uint64{regs.IP}, true
	if p := t.unwinder(tgid, false); p != nil {
		pcs, truncated = p.up.Unwind(regs, data, maxFrames)
		if truncated && len(pcs) > 0 && !p.up.Covers(pcs[len(pcs)-1]) {
			// Code mapped since (a command's libraries, dlopen).
			if p = t.unwinder(tgid, true); p != nil {
				pcs, truncated = p.up.Unwind(regs, data, maxFrames)
			}
		}
	}
	t.unwound++
	if truncated {
		t.trunc++
	}
	id := t.intern(pcs, truncated)
	t.seqs[seq] = id
	k := faultKey{pid: uint32(tgid), stack: id, size: size}
	if _, ok := t.faults[k]; !ok && len(t.faults) >= maxUserBuckets {
		t.full++
		return nil
	}
	t.faults[k]++
	return nil
}

// resolve returns the interned stack of a BPF stack id (copied seq, stack
// map id, or unknown: -1); lookup reads a stack map id's frames.
func (t *stackTable) resolve(sid uint32, lookup func(uint32) []uint64) int {
	switch {
	case sid == stackUnknown:
		return -1
	case sid&stackCopied != 0:
		if i, ok := t.seqs[sid&^stackCopied]; ok {
			return i
		}
		return -1
	}
	if i, ok := t.bpfIDs[sid]; ok {
		return i
	}
	pcs := lookup(sid)
	if len(pcs) == 0 {
		return -1
	}
	i := t.intern(pcs, false)
	t.bpfIDs[sid] = i
	return i
}

// forget drops the unwinding state of an exited process.
func (t *stackTable) forget(pid int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.procs[pid]; p != nil {
		p.up.Close()
		delete(t.procs, pid)
	}
}
