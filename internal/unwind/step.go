package unwind

// frame is the register state of one frame during a walk.
type frame struct {
	pc, sp, bp uint64
	bpValid    bool // rbp holds the caller's value (not clobbered by an undefined rule)
	exact      bool // pc is the exact instruction (first frame, or after a signal frame)
}

// lookupPC is the address whose unwind rules apply: the call instruction
// (pc-1) for a return address, pc itself for an exact pc.
func (f frame) lookupPC() uint64 {
	if f.exact {
		return f.pc
	}
	return f.pc - 1
}

type stepResult uint8

const (
	stepNext stepResult = iota // the caller's frame was computed
	stepEnd                    // outermost frame: the walk is complete
	stepStop                   // the walk cannot continue: truncated
)

// step unwinds one frame whose rules are those of ELF virtual address
// vaddr in tab (the frame-pointer rule where tab has no CFI for vaddr).
func (tab *table) step(vaddr uint64, f frame, st *stackReader) (frame, stepResult) {
	rw := tab.lookup(vaddr)
	if rw == nil {
		return stepFP(f, st)
	}
	return tab.stepCFI(rw, f, st)
}

// stepFP applies the frame-pointer rule (code without CFI): rbp must point
// into the copied stack, at or above rsp.
func stepFP(f frame, st *stackReader) (frame, stepResult) {
	if !f.bpValid || f.bp < f.sp || f.bp&7 != 0 || !st.contains(f.bp) {
		return f, stepStop
	}
	ra, ok1 := st.read(f.bp + 8)
	nbp, ok2 := st.read(f.bp)
	if !ok1 || !ok2 {
		return f, stepStop
	}
	return frame{pc: ra, sp: f.bp + 16, bp: nbp, bpValid: true}, stepNext
}

// stepCFI applies the CFI row rw of tab to f.
func (tab *table) stepCFI(rw *row, f frame, st *stackReader) (frame, stepResult) {
	if rw.flags&flagUnsupported != 0 {
		return f, stepStop
	}
	sp, bp, bpValid := f.sp, f.bp, f.bpValid
	x := exprCtx{sp: sp, bp: bp, pc: f.pc, bpValid: bpValid, st: st}
	var cfa uint64
	switch rw.cfaReg {
	case regRSP:
		cfa = sp + uint64(int64(rw.cfaOff))
	case regRBP:
		if !bpValid {
			return f, stepStop
		}
		cfa = bp + uint64(int64(rw.cfaOff))
	case cfaExpr:
		v, ok := eval(tab.exprs[rw.cfaOff], &x, 0, false)
		if !ok {
			return f, stepStop
		}
		cfa = v
	default:
		return f, stepStop
	}
	if cfa <= sp {
		return f, stepStop // the stack must grow towards the caller
	}
	if rw.raKind == ruleUndefined {
		return f, stepEnd // outermost frame (_start, thread start)
	}
	ra, ok := tab.ruleValue(rw.raKind, int64(rw.raOff), cfa, &x, st)
	if !ok {
		return f, stepStop
	}
	nsp := cfa
	if rw.flags&flagSP != 0 {
		// Signal frames restore rsp from the saved context, not the CFA.
		r := tab.sp[rw.pc]
		nsp, ok = tab.ruleValue(r.kind, r.off, cfa, &x, st)
		if !ok || nsp <= sp {
			return f, stepStop
		}
	}
	switch rw.bpKind {
	case ruleSame:
	case ruleUndefined:
		bpValid = false
	case ruleValOffset:
		bp, _ = tab.ruleValue(rw.bpKind, int64(rw.bpOff), cfa, &x, st) // validity as before
	case ruleOffset, ruleExpr, ruleValExpr:
		bp, bpValid = tab.ruleValue(rw.bpKind, int64(rw.bpOff), cfa, &x, st)
	case ruleRegister:
		switch rw.bpOff {
		case regRSP:
			bp = sp
		case regRBP:
		default:
			bpValid = false
		}
	default:
		bpValid = false
	}
	// A signal frame returns to the interrupted pc itself.
	return frame{pc: ra, sp: nsp, bp: bp, bpValid: bpValid, exact: rw.flags&flagSignal != 0}, stepNext
}

// ruleValue is a register's value in the caller's frame under a rule that
// computes it from the CFA (DWARF 5 section 6.4.1): ruleOffset, saved at
// CFA+off; ruleValOffset, CFA+off itself; ruleExpr, saved at the address
// expression off (an index into tab.exprs) computes with the CFA pushed;
// ruleValExpr, that expression's value. ok is false when the stack copy
// lacks the saved value, the expression fails, or the rule is of another
// kind (same value, undefined, register: the caller's to handle).
func (tab *table) ruleValue(kind uint8, off int64, cfa uint64, x *exprCtx, st *stackReader) (v uint64, ok bool) {
	switch kind {
	case ruleOffset:
		return st.read(cfa + uint64(off))
	case ruleValOffset:
		return cfa + uint64(off), true
	case ruleExpr, ruleValExpr:
		v, ok = eval(tab.exprs[off], x, cfa, true)
		if ok && kind == ruleExpr {
			v, ok = st.read(v)
		}
		return v, ok
	}
	return 0, false
}
