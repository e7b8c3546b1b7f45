package unwindtable

import "github.com/memprof/memprof/internal/unwind"

// Step unwinds one frame with the compact rule for vaddr, exactly as
// bpf/unwind.h does: read returns the 8-byte word at a user address (false
// when unreadable). The result matches unwind.Table.Step wherever the rule
// is not CFAStop (TestCompileMatchesInterpreter checks every pc).
func (t *Table) Step(vaddr uint64, s unwind.FrameState, read func(addr uint64) (uint64, bool)) (unwind.FrameState, unwind.StepResult) {
	return StepRule(t.Lookup(vaddr), s, read)
}

// StepRule applies rule to the frame state s.
func StepRule(r Rule, s unwind.FrameState, read func(uint64) (uint64, bool)) (unwind.FrameState, unwind.StepResult) {
	var cfa uint64
	switch r.CFA {
	case CFAFP:
		if !s.BPValid || s.BP < s.SP || s.BP&7 != 0 {
			return s, unwind.StepStop
		}
		ra, ok1 := read(s.BP + 8)
		nbp, ok2 := read(s.BP)
		if !ok1 || !ok2 {
			return s, unwind.StepStop
		}
		return unwind.FrameState{Regs: unwind.Regs{IP: ra, SP: s.BP + 16, BP: nbp}, BPValid: true}, unwind.StepNext
	case CFARSP:
		cfa = s.SP + uint64(int64(r.CFAOff))
	case CFARBP:
		if !s.BPValid {
			return s, unwind.StepStop
		}
		cfa = s.BP + uint64(int64(r.CFAOff))
	case CFASignal:
		// Every value comes from the saved context, relative to rsp.
		cfa, ok := read(s.SP + uint64(int64(r.CFAOff)))
		if !ok || cfa <= s.SP {
			return s, unwind.StepStop
		}
		ra, ok := read(s.SP + uint64(int64(r.CFAOff)) + 8)
		if !ok {
			return s, unwind.StepStop
		}
		n := unwind.FrameState{Regs: unwind.Regs{IP: ra, SP: cfa, BP: s.BP}, BPValid: s.BPValid, Exact: true}
		restoreBP(r, &n, s.SP, read)
		return n, unwind.StepNext
	case CFAPLT:
		cfa = s.SP + 8
		if int32(s.IP&15) >= r.CFAOff {
			cfa += 8
		}
	default:
		return s, unwind.StepStop
	}
	if cfa <= s.SP {
		return s, unwind.StepStop
	}
	if r.RA == RAEnd {
		return s, unwind.StepEnd
	}
	ra, ok := read(cfa - 8)
	if !ok {
		return s, unwind.StepStop
	}
	n := unwind.FrameState{Regs: unwind.Regs{IP: ra, SP: cfa, BP: s.BP}, BPValid: s.BPValid}
	restoreBP(r, &n, cfa, read)
	return n, unwind.StepNext
}

// restoreBP applies the rule's rbp to the caller's state n: saved at
// base+BPOff (base is the CFA, or rsp for a signal frame, whose saved
// context is relative to it), undefined, or unchanged.
func restoreBP(r Rule, n *unwind.FrameState, base uint64, read func(uint64) (uint64, bool)) {
	switch r.BP {
	case BPSaved:
		n.BP, n.BPValid = read(base + uint64(int64(r.BPOff)))
	case BPUndef:
		n.BPValid = false
	}
}
