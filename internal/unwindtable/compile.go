package unwindtable

import (
	"errors"
	"fmt"
	"math"

	"github.com/memprof/memprof/internal/unwind"
)

// Rule kinds, the same numbers as enum uw_cfa_kind, uw_ra_kind and
// uw_bp_kind of bpf/unwind.h (TestLayoutMatchesBPF checks them against the
// bpf2go output).
const (
	CFARSP  = 1 // CFA = rsp + CFAOff
	CFARBP  = 2 // CFA = rbp + CFAOff
	CFAPLT  = 3 // PLT entry: CFA = rsp + 8, + 8 more once (rip & 15) >= CFAOff
	CFAFP   = 4 // no CFI here: the frame-pointer rule
	CFAStop = 5 // a rule the BPF walk cannot evaluate: the walk ends, truncated
	// Signal trampoline (rt_sigreturn): the interrupted rsp is saved at
	// rsp+CFAOff (and is the CFA), its rip right after it, its rbp at
	// rsp+BPOff; the caller's pc is exact.
	CFASignal = 6

	RASaved = 0 // return address saved at CFA-8
	RAEnd   = 1 // return address undefined: outermost frame, the walk is complete

	BPSame  = 0 // rbp unchanged in the caller
	BPSaved = 1 // rbp saved at CFA + BPOff
	BPUndef = 2 // rbp has no known value in the caller
)

// Rule is how to recover the caller's rsp, rip and rbp: 12 bytes in BPF
// (struct uw_rule). BPOff is from the CFA, except for CFASignal (from rsp).
type Rule struct {
	CFA, RA, BP   uint8
	CFAOff, BPOff int32
}

// Row is one row of a compact table: Rule holds from PC (bytes from the
// table's Base) up to the next row's PC. 8 bytes in BPF (struct uw_row,
// whose rule is an index into the shared rule array).
type Row struct {
	PC   uint32
	Rule Rule
}

// Table is the compact unwind table of one object.
type Table struct {
	Base uint64 // ELF virtual address that row PCs are relative to (0 unless the code lies above 4 GiB)
	Rows []Row  // increasing PC; the last row is a CFAFP row ending the table
	// Stats of the conversion, for reports and tests.
	SourceRows  int // rows of the CFI table
	StopRows    int // rows the BPF walk cannot evaluate (unknown expressions, CFA in another register)
	PLTRows     int // rows with the PLT CFA expression
	Unsupported map[string]int
}

// Bytes is the table's size in the BPF row array (8 bytes a row).
func (t *Table) Bytes() int64 { return int64(len(t.Rows)) * RowBytes }

// RowBytes is the size of one row in the BPF row array.
const RowBytes = 8

// ErrTooLarge is returned for an object whose code spans more than 4 GiB
// (row PCs are 32-bit offsets) or has more rows than the limit given.
var ErrTooLarge = errors.New("unwind table too large")

// Compile converts the rows of a CFI table into a compact table of at most
// maxRows rows (<= 0: no limit). Rules the BPF walk cannot evaluate become
// CFAStop rows (counted in StopRows and Unsupported by reason); gaps between
// FDEs become CFAFP rows. Errors: ErrTooLarge.
func Compile(src *unwind.Table, maxRows int) (*Table, error) {
	in := src.Rows()
	t := &Table{SourceRows: len(in), Unsupported: map[string]int{}}
	if len(in) == 0 {
		return t, nil
	}
	if last := in[len(in)-1].PC; last > math.MaxUint32 {
		t.Base = in[0].PC // rare: code above 4 GiB; row pcs relative to the first row
	}
	if span := in[len(in)-1].PC - t.Base; span > math.MaxUint32 {
		return nil, fmt.Errorf("%w: code spans %d bytes (limit 4 GiB)", ErrTooLarge, span)
	}
	for _, r := range in {
		rule, why := convert(&r)
		if why != "" {
			t.StopRows++
			t.Unsupported[why]++
		}
		if rule.CFA == CFAPLT {
			t.PLTRows++
		}
		pc := uint32(r.PC - t.Base)
		if n := len(t.Rows); n > 0 && t.Rows[n-1].Rule == rule {
			continue // same rule: the previous row extends over this one
		}
		t.Rows = append(t.Rows, Row{PC: pc, Rule: rule})
		if maxRows > 0 && len(t.Rows) > maxRows {
			return nil, fmt.Errorf("%w: more than %d rows", ErrTooLarge, maxRows)
		}
	}
	if t.Rows[len(t.Rows)-1].Rule.CFA != CFAFP {
		// internal/unwind ends every FDE with a gap row; keep the invariant anyway.
		t.Rows = append(t.Rows, Row{PC: uint32(in[len(in)-1].PC - t.Base + 1), Rule: Rule{CFA: CFAFP}})
	}
	return t, nil
}

// pltExpr reports whether e is the CFA expression GNU ld emits for .plt
// entries, rsp + 8 + (((rip & 15) >= N) << 3), and returns N.
// Bytes: DW_OP_breg7 8, DW_OP_breg16 0, DW_OP_lit15, DW_OP_and, DW_OP_litN,
// DW_OP_ge, DW_OP_lit3, DW_OP_shl, DW_OP_plus.
func pltExpr(e []byte) (int32, bool) {
	if len(e) != 11 || e[0] != 0x77 || e[1] != 8 || e[2] != 0x80 || e[3] != 0 || e[4] != 0x3f ||
		e[5] != 0x1a || e[6] < 0x30 || e[6] > 0x3f || e[7] != 0x2a || e[8] != 0x33 || e[9] != 0x24 || e[10] != 0x22 {
		return 0, false
	}
	return int32(e[6] - 0x30), true
}

// convert maps one CFI row to a compact rule; why names the reason for a
// CFAStop rule.
func convert(r *unwind.Row) (Rule, string) {
	stop := func(why string) (Rule, string) { return Rule{CFA: CFAStop}, why }
	if r.NoCFI {
		return Rule{CFA: CFAFP}, ""
	}
	switch {
	case r.Unsupported:
		return stop("rule internal/unwind cannot evaluate")
	case r.Signal || r.SPRule:
		return signalRule(r)
	}
	var rule Rule
	switch r.CFAReg {
	case unwind.RegRSP:
		rule.CFA = CFARSP
	case unwind.RegRBP:
		rule.CFA = CFARBP
	case -1:
		n, ok := pltExpr(r.CFAExpr)
		if !ok {
			return stop("CFA expression")
		}
		rule.CFA, rule.CFAOff = CFAPLT, n
	default:
		return stop("CFA register")
	}
	if rule.CFA != CFAPLT {
		if r.CFAOffset < math.MinInt32 || r.CFAOffset > math.MaxInt32 {
			return stop("CFA offset")
		}
		rule.CFAOff = int32(r.CFAOffset)
	}
	switch {
	case r.RA.Kind == unwind.RuleUndefined:
		rule.RA = RAEnd
	case r.RA.Kind == unwind.RuleOffset && r.RA.Offset == -8:
		rule.RA = RASaved
	default:
		return stop("return-address rule")
	}
	switch r.BP.Kind {
	case unwind.RuleSame:
		rule.BP = BPSame
	case unwind.RuleUndefined:
		rule.BP = BPUndef
	case unwind.RuleOffset:
		if r.BP.Offset < math.MinInt32 || r.BP.Offset > math.MaxInt32 {
			return stop("rbp offset")
		}
		rule.BP, rule.BPOff = BPSaved, int32(r.BP.Offset)
	case unwind.RuleRegister:
		if r.BP.Offset != unwind.RegRBP {
			return stop("rbp rule")
		}
		rule.BP = BPSame
	default:
		return stop("rbp rule")
	}
	return rule, ""
}

// Lookup returns the rule for ELF virtual address vaddr: CFAFP outside the
// table.
func (t *Table) Lookup(vaddr uint64) Rule {
	if len(t.Rows) == 0 || vaddr < t.Base || vaddr-t.Base > math.MaxUint32 {
		return Rule{CFA: CFAFP}
	}
	pc := uint32(vaddr - t.Base)
	lo, hi := 0, len(t.Rows) // last row with PC <= pc, as bpf/unwind.h searches
	for lo < hi {
		mid := (lo + hi) / 2
		if t.Rows[mid].PC <= pc {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		return Rule{CFA: CFAFP}
	}
	return t.Rows[lo-1].Rule
}

// bregRSP reports whether e is DW_OP_breg7 (rsp) N [DW_OP_deref] and
// returns N.
func bregRSP(e []byte, deref bool) (int32, bool) {
	if len(e) < 2 || e[0] != 0x77 {
		return 0, false
	}
	var v int64
	var shift uint
	i := 1
	for ; i < len(e) && i < 6; i++ { // SLEB128
		b := e[i]
		v |= int64(b&0x7f) << shift
		shift += 7
		if b&0x80 == 0 {
			if b&0x40 != 0 {
				v |= -1 << shift
			}
			i++
			break
		}
	}
	rest := e[i:]
	if deref {
		if len(rest) != 1 || rest[0] != 0x06 {
			return 0, false
		}
	} else if len(rest) != 0 {
		return 0, false
	}
	if v < 0 || v > math.MaxInt32-8 {
		return 0, false
	}
	return int32(v), true
}

// signalRule converts the rules of a signal trampoline (glibc's and musl's
// __restore_rt: every register saved in the ucontext on the stack) to a
// CFASignal rule: CFA = *(rsp+N), return address saved at rsp+N+8, rsp saved
// at rsp+N, rbp saved at rsp+M. Anything else stops the walk.
func signalRule(r *unwind.Row) (Rule, string) {
	stop := Rule{CFA: CFAStop}
	if !r.Signal || r.CFAReg != -1 {
		return stop, "signal frame"
	}
	n, ok := bregRSP(r.CFAExpr, true)
	if !ok {
		return stop, "signal frame"
	}
	ra, ok1 := bregRSP(r.RA.Expr, false)
	sp, ok2 := bregRSP(r.SP.Expr, false)
	if !ok1 || !ok2 || r.RA.Kind != unwind.RuleExpr || ra != n+8 || !r.SPRule || r.SP.Kind != unwind.RuleExpr || sp != n {
		return stop, "signal frame"
	}
	rule := Rule{CFA: CFASignal, CFAOff: n}
	switch r.BP.Kind {
	case unwind.RuleExpr:
		bp, ok := bregRSP(r.BP.Expr, false)
		if !ok {
			return stop, "signal frame"
		}
		rule.BP, rule.BPOff = BPSaved, bp
	case unwind.RuleSame:
	case unwind.RuleUndefined:
		rule.BP = BPUndef
	default:
		return stop, "signal frame"
	}
	return rule, ""
}
