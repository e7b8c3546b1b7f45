package unwind

// exprCtx is the register state a DWARF expression may read.
type exprCtx struct {
	sp, bp, pc uint64
	bpValid    bool
	st         *stackReader
}

// eval evaluates a DWARF location expression as used in CFI
// (DW_CFA_def_cfa_expression, DW_CFA_expression, DW_CFA_val_expression).
// initial, when hasInitial, is pushed first (the CFA, for register rules).
// It supports the operators compilers emit in CFI: register-relative
// addresses, constants, arithmetic, comparisons, branches and memory reads
// from the copied stack. ok is false for anything else.
func eval(expr []byte, x *exprCtx, initial uint64, hasInitial bool) (uint64, bool) {
	var stack [16]uint64
	n := 0
	push := func(v uint64) bool {
		if n == len(stack) {
			return false
		}
		stack[n] = v
		n++
		return true
	}
	if hasInitial {
		push(initial)
	}
	r := &reader{b: expr}
	reg := func(num uint64) (uint64, bool) {
		switch num {
		case regRSP:
			return x.sp, true
		case regRBP:
			return x.bp, x.bpValid
		case regRIP:
			return x.pc, true
		}
		return 0, false
	}
	steps := 0
	for r.pos < len(r.b) {
		if steps++; steps > 256 {
			return 0, false // loop guard for DW_OP_bra/skip
		}
		op := r.u8()
		switch {
		case op >= 0x30 && op <= 0x4f: // lit0..lit31
			if !push(uint64(op - 0x30)) {
				return 0, false
			}
			continue
		case op >= 0x70 && op <= 0x8f: // breg0..breg31
			v, ok := reg(uint64(op - 0x70))
			off := r.sleb()
			if !ok || !push(v+uint64(off)) {
				return 0, false
			}
			continue
		}
		// Binary operators need two operands.
		binop := func(f func(a, b uint64) uint64) bool {
			if n < 2 {
				return false
			}
			a, b := stack[n-2], stack[n-1]
			n--
			stack[n-1] = f(a, b)
			return true
		}
		b2u := func(c bool) uint64 {
			if c {
				return 1
			}
			return 0
		}
		ok := true
		switch op {
		case 0x03: // addr
			ok = push(r.u64())
		case 0x06: // deref
			if n < 1 {
				return 0, false
			}
			v, good := x.st.read(stack[n-1])
			if !good {
				return 0, false
			}
			stack[n-1] = v
		case 0x94: // deref_size
			size := r.u8()
			if n < 1 || size == 0 || size > 8 {
				return 0, false
			}
			v, good := x.st.read(stack[n-1])
			if !good {
				return 0, false
			}
			if size < 8 {
				v &= (1 << (8 * uint(size))) - 1
			}
			stack[n-1] = v
		case 0x08:
			ok = push(uint64(r.u8()))
		case 0x09:
			ok = push(uint64(int64(int8(r.u8()))))
		case 0x0a:
			ok = push(uint64(r.u16()))
		case 0x0b:
			ok = push(uint64(int64(int16(r.u16()))))
		case 0x0c:
			ok = push(uint64(r.u32()))
		case 0x0d:
			ok = push(uint64(int64(int32(r.u32()))))
		case 0x0e, 0x0f:
			ok = push(r.u64())
		case 0x10:
			ok = push(r.uleb())
		case 0x11:
			ok = push(uint64(r.sleb()))
		case 0x12: // dup
			ok = n >= 1 && push(stack[n-1])
		case 0x13: // drop
			ok = n >= 1
			if ok {
				n--
			}
		case 0x14: // over
			ok = n >= 2 && push(stack[n-2])
		case 0x15: // pick
			i := int(r.u8())
			ok = i < n && push(stack[n-1-i])
		case 0x16: // swap
			ok = n >= 2
			if ok {
				stack[n-1], stack[n-2] = stack[n-2], stack[n-1]
			}
		case 0x17: // rot
			ok = n >= 3
			if ok {
				stack[n-1], stack[n-2], stack[n-3] = stack[n-2], stack[n-3], stack[n-1]
			}
		case 0x19: // abs
			ok = n >= 1
			if ok && int64(stack[n-1]) < 0 {
				stack[n-1] = -stack[n-1]
			}
		case 0x1a:
			ok = binop(func(a, b uint64) uint64 { return a & b })
		case 0x1b: // div (signed)
			if n < 2 || stack[n-1] == 0 {
				return 0, false
			}
			ok = binop(func(a, b uint64) uint64 { return uint64(int64(a) / int64(b)) })
		case 0x1c:
			ok = binop(func(a, b uint64) uint64 { return a - b })
		case 0x1d: // mod
			if n < 2 || stack[n-1] == 0 {
				return 0, false
			}
			ok = binop(func(a, b uint64) uint64 { return a % b })
		case 0x1e:
			ok = binop(func(a, b uint64) uint64 { return a * b })
		case 0x1f: // neg
			ok = n >= 1
			if ok {
				stack[n-1] = -stack[n-1]
			}
		case 0x20: // not
			ok = n >= 1
			if ok {
				stack[n-1] = ^stack[n-1]
			}
		case 0x21:
			ok = binop(func(a, b uint64) uint64 { return a | b })
		case 0x22:
			ok = binop(func(a, b uint64) uint64 { return a + b })
		case 0x23: // plus_uconst
			v := r.uleb()
			ok = n >= 1
			if ok {
				stack[n-1] += v
			}
		case 0x24:
			ok = binop(func(a, b uint64) uint64 { return a << (b & 63) })
		case 0x25:
			ok = binop(func(a, b uint64) uint64 { return a >> (b & 63) })
		case 0x26:
			ok = binop(func(a, b uint64) uint64 { return uint64(int64(a) >> (b & 63)) })
		case 0x27:
			ok = binop(func(a, b uint64) uint64 { return a ^ b })
		case 0x29:
			ok = binop(func(a, b uint64) uint64 { return b2u(a == b) })
		case 0x2a:
			ok = binop(func(a, b uint64) uint64 { return b2u(int64(a) >= int64(b)) })
		case 0x2b:
			ok = binop(func(a, b uint64) uint64 { return b2u(int64(a) > int64(b)) })
		case 0x2c:
			ok = binop(func(a, b uint64) uint64 { return b2u(int64(a) <= int64(b)) })
		case 0x2d:
			ok = binop(func(a, b uint64) uint64 { return b2u(int64(a) < int64(b)) })
		case 0x2e:
			ok = binop(func(a, b uint64) uint64 { return b2u(a != b) })
		case 0x2f: // skip
			d := int16(r.u16())
			r.pos += int(d)
			ok = r.pos >= 0 && r.pos <= len(r.b)
		case 0x28: // bra
			d := int16(r.u16())
			if n < 1 {
				return 0, false
			}
			n--
			if stack[n] != 0 {
				r.pos += int(d)
				ok = r.pos >= 0 && r.pos <= len(r.b)
			}
		case 0x92: // bregx
			v, good := reg(r.uleb())
			off := r.sleb()
			ok = good && push(v+uint64(off))
		case 0x96: // nop
		default:
			return 0, false
		}
		if !ok || r.err != nil {
			return 0, false
		}
	}
	if n < 1 || r.err != nil {
		return 0, false
	}
	return stack[n-1], true
}
