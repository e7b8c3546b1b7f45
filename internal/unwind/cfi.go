package unwind

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"

	"github.com/memprof/memprof/internal/targetfs"
)

// x86-64 DWARF register numbers used by the unwinder.
const (
	regRBP = 6
	regRSP = 7
	regRIP = 16 // return address column used by GCC and clang on x86-64
)

// Rule kinds for the rbp and return-address columns of a row.
const (
	ruleSame      uint8 = iota // same value as in the callee (initial rule of callee-saved registers)
	ruleUndefined              // no value: for the return address, the outermost frame
	ruleOffset                 // saved at CFA+off
	ruleValOffset              // value is CFA+off
	ruleExpr                   // saved at address given by expression off (index into exprs)
	ruleValExpr                // value given by expression off
	ruleRegister               // value is in register off (only rsp/rbp/rip are known)
)

// Kinds of CFA rule (row.cfaReg holds the register for register rules).
const (
	cfaExpr uint8 = 0xfe // CFA given by expression (index in cfaOff)
	cfaNone uint8 = 0xff // gap: no FDE covers this pc
)

// row flags
const (
	flagUnsupported uint8 = 1 << iota // a rule the unwinder cannot evaluate
	flagSignal                        // FDE of a signal trampoline ('S' augmentation)
	flagSP                            // rsp has its own rule (signal frames): see table.sp
)

// row is one line of the unwind table: the rules that hold from pc up to the
// next row's pc. pc is an ELF virtual address of the object.
type row struct {
	pc     uint64
	cfaOff int32
	raOff  int32
	bpOff  int32
	cfaReg uint8
	raKind uint8
	bpKind uint8
	flags  uint8
}

const rowSize = 24 // bytes per row, for cache accounting

// table is the parsed unwind information of one object.
type table struct {
	rows  []row
	exprs [][]byte           // DWARF expressions referenced by rows
	sp    map[uint64]regRule // rsp rule of rows with flagSP, by row pc
	fdes  int                // FDEs parsed
	frFDE int                // FDEs of functions that set up a frame (CFA moves; no PLT expressions)
	fpFDE int                // of those, FDEs whose CFA is rbp-based after the prologue
	bytes int64
	// truncated is set when the table hit maxRows and FDEs were dropped.
	truncated bool
}

// lookup returns the row for ELF virtual address pc, or nil if no FDE covers it.
func (t *table) lookup(pc uint64) *row {
	rows := t.rows
	// Last row with rows[i].pc <= pc.
	i := sort.Search(len(rows), func(i int) bool { return rows[i].pc > pc }) - 1
	if i < 0 || rows[i].cfaReg == cfaNone {
		return nil
	}
	return &rows[i]
}

// cfiState is the set of rules tracked while running CFA programs.
type cfiState struct {
	cfaReg uint64
	cfaOff int64
	cfaExp int // index into exprs when cfaIsExp
	cfaIsX bool
	ra     regRule
	bp     regRule
	sp     regRule // rsp rule; the default, val_offset(0), is "rsp = CFA"
	raBad  bool
}

type regRule struct {
	kind uint8
	off  int64
}

type cie struct {
	codeAlign  uint64
	dataAlign  int64
	raReg      uint64
	fdeEnc     uint8
	hasAug     bool // 'z'
	signal     bool
	initStart  int // initial instructions, as offsets in the section
	initEnd    int
	addrSize   int
	segSize    int
	ehFrame    bool
	lsdaEnc    uint8
	version    uint8
	parseError error

	initDone bool     // init holds the state after the initial instructions
	init     cfiState //
	initErr  error
}

// parser holds the section being parsed.
type parser struct {
	data    []byte
	addr    uint64 // virtual address of data[0] (for pcrel pointers)
	eh      bool   // .eh_frame rather than .debug_frame
	exprs   *[][]byte
	dataRel uint64      // base for DW_EH_PE_datarel (address of .eh_frame_hdr, or 0)
	exprAt  map[int]int // section offset of an expression -> index in exprs
}

type fde struct {
	begin, end       uint64
	cie              *cie
	p                *parser
	insStart, insEnd int // instructions, as offsets in the section
}

var errShort = errors.New("truncated CFI data")

type reader struct {
	b   []byte
	pos int
	err error
}

func (r *reader) u8() uint8 {
	if r.pos >= len(r.b) {
		r.err = errShort
		return 0
	}
	v := r.b[r.pos]
	r.pos++
	return v
}

func (r *reader) bytes(n int) []byte {
	if n < 0 || n > len(r.b)-r.pos {
		r.err = errShort
		r.pos = len(r.b)
		return nil
	}
	v := r.b[r.pos : r.pos+n]
	r.pos += n
	return v
}

func (r *reader) u16() uint16 {
	b := r.bytes(2)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint16(b)
}

func (r *reader) u32() uint32 {
	b := r.bytes(4)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

func (r *reader) u64() uint64 {
	b := r.bytes(8)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint64(b)
}

func (r *reader) uleb() uint64 {
	var v uint64
	var shift uint
	for {
		c := r.u8()
		if r.err != nil {
			return 0
		}
		if shift < 64 {
			v |= uint64(c&0x7f) << shift
		}
		shift += 7
		if c&0x80 == 0 {
			return v
		}
	}
}

func (r *reader) sleb() int64 {
	var v int64
	var shift uint
	var c uint8
	for {
		c = r.u8()
		if r.err != nil {
			return 0
		}
		if shift < 64 {
			v |= int64(c&0x7f) << shift
		}
		shift += 7
		if c&0x80 == 0 {
			break
		}
	}
	if shift < 64 && c&0x40 != 0 {
		v |= -1 << shift
	}
	return v
}

// maxCString bounds a CIE augmentation string (real ones: "zR", "zPLR", ...).
const maxCString = 64

func (r *reader) cstring() string {
	start := r.pos
	for r.pos < len(r.b) && r.b[r.pos] != 0 {
		r.pos++
		if r.pos-start > maxCString {
			r.err = errShort
			return ""
		}
	}
	s := string(r.b[start:r.pos])
	if r.pos >= len(r.b) {
		r.err = errShort
		return s
	}
	r.pos++
	return s
}

// DW_EH_PE pointer encodings.
const (
	peAbsptr  = 0x00
	peUleb    = 0x01
	peUdata2  = 0x02
	peUdata4  = 0x03
	peUdata8  = 0x04
	peSleb    = 0x09
	peSdata2  = 0x0a
	peSdata4  = 0x0b
	peSdata8  = 0x0c
	pePcrel   = 0x10
	peDatarel = 0x30
	peIndir   = 0x80
	peOmit    = 0xff
)

// pointer reads an encoded pointer at the reader position. applyRel=false
// reads only the value format (used for pc_range).
func (p *parser) pointer(r *reader, enc uint8, applyRel bool) (uint64, error) {
	if enc == peOmit {
		return 0, nil
	}
	pos := uint64(r.pos)
	var v uint64
	switch enc & 0x0f {
	case peAbsptr:
		v = r.u64()
	case peUleb:
		v = r.uleb()
	case peUdata2:
		v = uint64(r.u16())
	case peUdata4:
		v = uint64(r.u32())
	case peUdata8:
		v = r.u64()
	case peSleb:
		v = uint64(r.sleb())
	case peSdata2:
		v = uint64(int64(int16(r.u16())))
	case peSdata4:
		v = uint64(int64(int32(r.u32())))
	case peSdata8:
		v = r.u64()
	default:
		return 0, fmt.Errorf("unsupported pointer encoding %#x", enc)
	}
	if r.err != nil {
		return 0, r.err
	}
	if !applyRel {
		return v, nil
	}
	switch enc & 0x70 {
	case 0:
	case pePcrel:
		v += p.addr + pos
	case peDatarel:
		v += p.dataRel
	default:
		return 0, fmt.Errorf("unsupported pointer application %#x", enc&0x70)
	}
	if enc&peIndir != 0 {
		return 0, fmt.Errorf("indirect pointer encoding %#x not supported", enc)
	}
	return v, nil
}

// parseEntries walks all CIEs and FDEs of the section.
func (p *parser) parseEntries() ([]fde, error) {
	cies := map[uint64]*cie{}
	var fdes []fde
	off := 0
	for off < len(p.data) {
		r := &reader{b: p.data, pos: off}
		length := uint64(r.u32())
		is64 := false
		if length == 0xffffffff {
			length = r.u64()
			is64 = true
		}
		if r.err != nil {
			return fdes, fmt.Errorf("CFI entry header at %#x: %w", off, r.err)
		}
		if length == 0 {
			if p.eh {
				break // terminator
			}
			off = r.pos
			continue
		}
		bodyStart := r.pos
		end := bodyStart + int(length)
		if length > uint64(len(p.data)) || end > len(p.data) || end < bodyStart {
			return fdes, fmt.Errorf("CFI entry at %#x: length %d runs past the section", off, length)
		}
		var id uint64
		if is64 && !p.eh { // .eh_frame CIE pointers are 4 bytes even in 64-bit entries
			id = r.u64()
		} else {
			id = uint64(r.u32())
		}
		isCIE := false
		if p.eh {
			isCIE = id == 0
		} else {
			isCIE = (!is64 && id == 0xffffffff) || (is64 && id == ^uint64(0))
		}
		body := &reader{b: p.data[:end], pos: r.pos}
		if isCIE {
			c := p.parseCIE(body)
			cies[uint64(off)] = c
		} else {
			var cieOff uint64
			if p.eh {
				cieOff = uint64(bodyStart) - id
			} else {
				cieOff = id
			}
			c, ok := cies[cieOff]
			if !ok {
				// CIE after its FDE (allowed in .debug_frame): parse it on demand.
				c = p.cieAt(cieOff)
				cies[cieOff] = c
			}
			if c != nil && c.parseError == nil {
				if f, ok := p.parseFDE(body, c); ok {
					fdes = append(fdes, f)
				}
			}
		}
		off = end
	}
	return fdes, nil
}

// cieAt parses the CIE at section offset off (a CIE that follows the FDEs
// using it). Its length, 32- or 64-bit, is checked against the section
// before anything is sliced.
func (p *parser) cieAt(off uint64) *cie {
	if off >= uint64(len(p.data)) {
		return nil
	}
	r := &reader{b: p.data, pos: int(off)}
	length := uint64(r.u32())
	if length == 0xffffffff {
		length = r.u64()
	}
	bodyStart := uint64(r.pos)
	if r.err != nil || length == 0 || length > uint64(len(p.data))-bodyStart {
		return nil
	}
	end := int(bodyStart + length)
	body := &reader{b: p.data[:end], pos: r.pos}
	if length >= 1<<32-1 && !p.eh {
		body.u64() // 64-bit CIE id
	} else {
		body.u32()
	}
	if body.err != nil {
		return nil
	}
	return p.parseCIE(body)
}

func (p *parser) parseCIE(r *reader) *cie {
	c := &cie{ehFrame: p.eh, addrSize: 8, fdeEnc: peAbsptr, lsdaEnc: peOmit}
	c.version = r.u8()
	aug := r.cstring()
	if c.version >= 4 {
		c.addrSize = int(r.u8())
		c.segSize = int(r.u8())
	}
	c.codeAlign = r.uleb()
	c.dataAlign = r.sleb()
	if c.version == 1 {
		c.raReg = uint64(r.u8())
	} else {
		c.raReg = r.uleb()
	}
	if len(aug) > 0 && aug[0] == 'z' {
		c.hasAug = true
		n := r.uleb()
		augData := &reader{b: r.bytes(clampLen(n))}
		for _, ch := range aug[1:] {
			switch ch {
			case 'L':
				c.lsdaEnc = augData.u8()
			case 'R':
				c.fdeEnc = augData.u8()
			case 'P':
				enc := augData.u8()
				if _, err := p.pointer(augData, enc&0x7f, false); err != nil {
					c.parseError = err
				}
			case 'S':
				c.signal = true
			case 'B', 'G':
			default:
				// Unknown augmentation: the data length lets us skip it.
			}
		}
	} else if aug != "" && aug != "eh" {
		c.parseError = fmt.Errorf("unknown CIE augmentation %q", aug)
	}
	if r.err != nil {
		c.parseError = r.err
	}
	c.initStart, c.initEnd = r.pos, len(r.b)
	return c
}

func (p *parser) parseFDE(r *reader, c *cie) (fde, bool) {
	f := fde{cie: c, p: p}
	var err error
	if p.eh {
		f.begin, err = p.pointer(r, c.fdeEnc, true)
		if err != nil {
			return f, false
		}
		var n uint64
		n, err = p.pointer(r, c.fdeEnc&0x0f, false)
		if err != nil {
			return f, false
		}
		f.end = f.begin + n
	} else {
		if c.addrSize == 4 {
			f.begin = uint64(r.u32())
			f.end = f.begin + uint64(r.u32())
		} else {
			f.begin = r.u64()
			f.end = f.begin + r.u64()
		}
	}
	if c.hasAug {
		n := r.uleb()
		r.bytes(clampLen(n))
	}
	if r.err != nil || f.end <= f.begin || f.begin == 0 {
		return f, false
	}
	f.insStart, f.insEnd = r.pos, len(r.b)
	return f, true
}

// addExpr records the DWARF expression b found at section offset off and
// returns its index in the table's exprs. An expression is stored once per
// offset, however many FDEs share it (a CIE's initial instructions run for
// every FDE of the CIE: a hostile 512 KiB expression in one CIE must not be
// copied per FDE).
func (p *parser) addExpr(off int, b []byte) int {
	if i, ok := p.exprAt[off]; ok {
		return i
	}
	if p.exprAt == nil {
		p.exprAt = map[int]int{}
	}
	*p.exprs = append(*p.exprs, append([]byte(nil), b...))
	i := len(*p.exprs) - 1
	p.exprAt[off] = i
	return i
}

// clampLen converts a length read from CFI to an int, mapping values that do
// not fit to -1 (which reader.bytes rejects).
func clampLen(n uint64) int {
	if n > 1<<31 {
		return -1
	}
	return int(n)
}

// maxStateStack bounds DW_CFA_remember_state nesting (compilers use 1-2).
const maxStateStack = 64

// maxRows bounds the rows of one object's table (24 bytes each): a hostile
// FDE could otherwise turn each byte of its instructions into a row.
const maxRows = 8 << 20

// run executes CFA instructions, calling emit(loc, state) before each
// location advance. It stops at limit (exclusive).
func (p *parser) run(start, end int, c *cie, st *cfiState, initial *cfiState, loc *uint64, limit uint64, emit func(uint64, *cfiState)) error {
	if start < 0 || start > end || end > len(p.data) {
		return errShort
	}
	r := &reader{b: p.data[:end], pos: start} // positions are section offsets, as pcrel needs
	var stack []cfiState
	setRule := func(reg uint64, rule regRule) {
		switch reg {
		case regRBP:
			st.bp = rule
		case c.raReg:
			st.ra = rule
			st.raBad = rule.kind == ruleRegister && rule.off != regRSP && rule.off != regRBP
		case regRSP:
			st.sp = rule
		}
	}
	restore := func(reg uint64) {
		if initial == nil {
			if reg == regRSP {
				st.sp = regRule{kind: ruleValOffset}
			} else {
				setRule(reg, regRule{kind: ruleSame})
			}
			return
		}
		switch reg {
		case regRBP:
			st.bp = initial.bp
		case c.raReg:
			st.ra = initial.ra
			st.raBad = initial.raBad
		case regRSP:
			st.sp = initial.sp
		}
	}
	advance := func(delta uint64) {
		emit(*loc, st)
		*loc += delta
	}
	for r.pos < len(r.b) && r.err == nil {
		if *loc >= limit {
			break
		}
		op := r.u8()
		switch op >> 6 {
		case 1: // DW_CFA_advance_loc
			advance(uint64(op&0x3f) * c.codeAlign)
			continue
		case 2: // DW_CFA_offset
			reg := uint64(op & 0x3f)
			setRule(reg, regRule{kind: ruleOffset, off: int64(r.uleb()) * c.dataAlign})
			continue
		case 3: // DW_CFA_restore
			restore(uint64(op & 0x3f))
			continue
		}
		switch op {
		case 0x00: // nop
		case 0x01: // set_loc
			v, err := p.pointer(r, c.fdeEnc, true)
			if err != nil {
				return err
			}
			emit(*loc, st)
			*loc = v
		case 0x02:
			advance(uint64(r.u8()) * c.codeAlign)
		case 0x03:
			advance(uint64(r.u16()) * c.codeAlign)
		case 0x04:
			advance(uint64(r.u32()) * c.codeAlign)
		case 0x05: // offset_extended
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleOffset, off: int64(r.uleb()) * c.dataAlign})
		case 0x06: // restore_extended
			restore(r.uleb())
		case 0x07: // undefined
			setRule(r.uleb(), regRule{kind: ruleUndefined})
		case 0x08: // same_value
			setRule(r.uleb(), regRule{kind: ruleSame})
		case 0x09: // register
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleRegister, off: int64(r.uleb())})
		case 0x0a: // remember_state
			if len(stack) >= maxStateStack {
				return fmt.Errorf("DW_CFA_remember_state nested deeper than %d", maxStateStack)
			}
			stack = append(stack, *st)
		case 0x0b: // restore_state
			if len(stack) == 0 {
				return errors.New("DW_CFA_restore_state with empty stack")
			}
			// The CFA rule is part of the state in practice (GCC relies on it).
			*st = stack[len(stack)-1]
			stack = stack[:len(stack)-1]
		case 0x0c: // def_cfa
			st.cfaReg = r.uleb()
			st.cfaOff = int64(r.uleb())
			st.cfaIsX = false
		case 0x0d: // def_cfa_register
			st.cfaReg = r.uleb()
			st.cfaIsX = false
		case 0x0e: // def_cfa_offset
			st.cfaOff = int64(r.uleb())
		case 0x0f: // def_cfa_expression
			n := r.uleb()
			off := r.pos
			b := r.bytes(clampLen(n))
			st.cfaIsX = true
			st.cfaExp = p.addExpr(off, b)
		case 0x10: // expression
			reg := r.uleb()
			n := r.uleb()
			off := r.pos
			b := r.bytes(clampLen(n))
			setRule(reg, regRule{kind: ruleExpr, off: int64(p.addExpr(off, b))})
		case 0x11: // offset_extended_sf
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleOffset, off: r.sleb() * c.dataAlign})
		case 0x12: // def_cfa_sf
			st.cfaReg = r.uleb()
			st.cfaOff = r.sleb() * c.dataAlign
			st.cfaIsX = false
		case 0x13: // def_cfa_offset_sf
			st.cfaOff = r.sleb() * c.dataAlign
		case 0x14: // val_offset
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleValOffset, off: int64(r.uleb()) * c.dataAlign})
		case 0x15: // val_offset_sf
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleValOffset, off: r.sleb() * c.dataAlign})
		case 0x16: // val_expression
			reg := r.uleb()
			n := r.uleb()
			off := r.pos
			b := r.bytes(clampLen(n))
			setRule(reg, regRule{kind: ruleValExpr, off: int64(p.addExpr(off, b))})
		case 0x2e: // GNU_args_size
			r.uleb()
		case 0x2f: // GNU_negative_offset_extended
			reg := r.uleb()
			setRule(reg, regRule{kind: ruleOffset, off: -int64(r.uleb()) * c.dataAlign})
		default:
			return fmt.Errorf("unknown CFA instruction %#x", op)
		}
	}
	if r.err != nil {
		return r.err
	}
	return nil
}

func (s *cfiState) toRow(pc uint64, signal bool) row {
	rw := row{pc: pc}
	if s.cfaIsX {
		rw.cfaReg = cfaExpr
		rw.cfaOff = int32(s.cfaExp)
	} else {
		rw.cfaReg = uint8(s.cfaReg)
		if s.cfaReg > 0xf0 {
			// Not a register the unwinder knows; and its low byte must not
			// alias the cfaExpr / cfaNone markers (a fuzzer-found row whose
			// "register" 0xfe named a missing expression).
			rw.cfaReg = 0
			rw.flags |= flagUnsupported
		}
		if int64(int32(s.cfaOff)) != s.cfaOff {
			rw.flags |= flagUnsupported
		}
		if s.cfaReg != regRSP && s.cfaReg != regRBP {
			rw.flags |= flagUnsupported
		}
		rw.cfaOff = int32(s.cfaOff)
	}
	rw.raKind, rw.raOff = s.ra.kind, int32(s.ra.off)
	rw.bpKind, rw.bpOff = s.bp.kind, int32(s.bp.off)
	if s.raBad {
		rw.flags |= flagUnsupported
	}
	switch s.sp.kind {
	case ruleValOffset:
		if s.sp.off != 0 {
			rw.flags |= flagSP
		}
	case ruleOffset, ruleExpr, ruleValExpr:
		rw.flags |= flagSP
	default: // undefined, same value, register: not meaningful for rsp
		rw.flags |= flagUnsupported
	}
	if signal {
		rw.flags |= flagSignal
	}
	return rw
}

// buildTable turns FDEs into a sorted row table.
func buildTable(fdes []fde, exprs *[][]byte) *table {
	sort.SliceStable(fdes, func(i, j int) bool { return fdes[i].begin < fdes[j].begin })
	t := &table{}
	push := func(rw row) {
		n := len(t.rows)
		// Drop rows this one supersedes (same pc, or overlapping FDEs).
		for n > 0 && t.rows[n-1].pc >= rw.pc {
			n--
		}
		t.rows = t.rows[:n]
		if n > 0 {
			last := &t.rows[n-1]
			if last.cfaReg == rw.cfaReg && last.cfaOff == rw.cfaOff && last.raKind == rw.raKind &&
				last.raOff == rw.raOff && last.bpKind == rw.bpKind && last.bpOff == rw.bpOff && last.flags == rw.flags &&
				rw.flags&flagSP == 0 {
				return // same rules: extend the previous row
			}
		}
		t.rows = append(t.rows, rw)
	}
	for _, f := range fdes {
		c := f.cie
		var init cfiState
		init.ra = regRule{kind: ruleSame}
		init.bp = regRule{kind: ruleSame}
		init.sp = regRule{kind: ruleValOffset}
		// The CIE's initial instructions are run once per CIE, not per FDE:
		// they never advance the location in practice, so their result does
		// not depend on the FDE.
		if !c.initDone {
			c.initDone = true
			var zero uint64
			c.init = init
			c.initErr = f.p.run(c.initStart, c.initEnd, c, &c.init, nil, &zero, ^uint64(0), func(uint64, *cfiState) {})
		}
		if c.initErr != nil {
			continue
		}
		init = c.init
		loc := f.begin
		st := init
		var rows []row
		fp, moved, expr := false, false, false
		emit := func(at uint64, s *cfiState) {
			if at >= f.end || len(rows) >= maxRows {
				return
			}
			switch {
			case s.cfaIsX:
				expr = true
			case s.cfaReg == regRBP:
				fp, moved = true, true
			case s.cfaReg != init.cfaReg || s.cfaOff != init.cfaOff:
				moved = true
			}
			rw := s.toRow(at, c.signal)
			if rw.flags&flagSP != 0 {
				if t.sp == nil {
					t.sp = map[uint64]regRule{}
				}
				t.sp[at] = s.sp
			}
			rows = append(rows, rw)
		}
		if err := f.p.run(f.insStart, f.insEnd, c, &st, &init, &loc, f.end, emit); err != nil {
			continue
		}
		emit(loc, &st)
		// Rows must be increasing; a set_loc going backwards makes the FDE unusable.
		ok := true
		for i := 1; i < len(rows); i++ {
			if rows[i].pc < rows[i-1].pc {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		t.fdes++
		if moved && !expr {
			t.frFDE++
			if fp {
				t.fpFDE++
			}
		}
		if len(t.rows)+len(rows) > maxRows {
			t.truncated = true
			break
		}
		for _, rw := range rows {
			push(rw)
		}
		push(row{pc: f.end, cfaReg: cfaNone})
	}
	t.rows = append([]row(nil), t.rows...) // trim capacity
	t.exprs = *exprs
	t.bytes = int64(len(t.rows))*rowSize + 256
	for _, e := range t.exprs {
		t.bytes += int64(len(e)) + 24
	}
	t.bytes += int64(len(t.sp)) * 48
	return t
}

// parseTable reads the call-frame information of an ELF file: .eh_frame,
// plus the FDEs of .debug_frame for code .eh_frame does not cover (objects
// built with -fno-asynchronous-unwind-tables -g have only .debug_frame).
func parseTable(f *elf.File) (*table, error) {
	if f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("unsupported ELF machine %v (only x86-64)", f.Machine)
	}
	var errs []error
	var exprs [][]byte
	var all []fde
	for _, name := range []string{".eh_frame", ".debug_frame"} {
		s := f.Section(name)
		if s == nil || s.Type == elf.SHT_NOBITS || s.Size == 0 {
			continue
		}
		data, err := targetfs.SectionData(s, targetfs.MaxCFIBytes)
		if err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", name, err))
			continue
		}
		p := &parser{data: data, addr: s.Addr, eh: name == ".eh_frame", exprs: &exprs}
		if hdr := f.Section(".eh_frame_hdr"); hdr != nil {
			p.dataRel = hdr.Addr
		}
		fdes, err := p.parseEntries()
		if err != nil {
			errs = append(errs, fmt.Errorf("parse %s: %w", name, err))
		}
		if len(all) == 0 {
			all = fdes
			continue
		}
		// Keep only .debug_frame FDEs that no .eh_frame FDE overlaps.
		eh := slices.Clone(all)
		sort.Slice(eh, func(i, j int) bool { return eh[i].begin < eh[j].begin })
		for _, d := range fdes {
			i := sort.Search(len(eh), func(i int) bool { return eh[i].begin >= d.end })
			if i > 0 && eh[i-1].end > d.begin {
				continue
			}
			all = append(all, d)
		}
	}
	t := buildTable(all, &exprs)
	if t.truncated {
		errs = append(errs, fmt.Errorf("more than %d unwind rows: FDEs beyond them are ignored", maxRows))
		return t, errors.Join(errs...)
	}
	if t.fdes == 0 && len(errs) > 0 {
		return t, errors.Join(errs...)
	}
	return t, nil // no CFI at all is not an error: frame-pointer fallback only
}
