package unwind

import (
	"debug/elf"
	"os"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/targetfs"
)

// Table is the parsed call-frame information of one object, for consumers
// that derive their own unwind tables from it (internal/unwindtable builds
// the compact tables the BPF unwinder evaluates) and check them against
// this package's interpreter.
type Table struct{ t *table }

// ParseTable reads the CFI of an x86-64 ELF object (.eh_frame, plus
// .debug_frame for code .eh_frame does not cover). An object without CFI
// gives an empty Table and no error. Errors: not x86-64, or CFI present but
// no FDE usable (the Table then holds what could be parsed).
func ParseTable(f *elf.File) (*Table, error) {
	t, err := parseTable(f)
	if t == nil {
		return nil, err
	}
	return &Table{t: t}, err
}

// RuleKind is how a register is recovered in the caller's frame (DWARF 5
// section 6.4.1 register rules).
type RuleKind uint8

// Register rules.
const (
	RuleSame      = RuleKind(ruleSame)      // same value as in the callee
	RuleUndefined = RuleKind(ruleUndefined) // no value (return address: outermost frame)
	RuleOffset    = RuleKind(ruleOffset)    // saved at CFA+Offset
	RuleValOffset = RuleKind(ruleValOffset) // value is CFA+Offset
	RuleExpr      = RuleKind(ruleExpr)      // saved at the address Expr computes
	RuleValExpr   = RuleKind(ruleValExpr)   // value Expr computes
	RuleRegister  = RuleKind(ruleRegister)  // value is in DWARF register Offset
)

// DWARF x86-64 register numbers of the CFA rule.
const (
	RegRBP = regRBP
	RegRSP = regRSP
)

// RegRule is the rule of one register in a Row.
type RegRule struct {
	Kind   RuleKind
	Offset int64  // bytes from the CFA, or a register number for RuleRegister
	Expr   []byte // DWARF expression for RuleExpr/RuleValExpr
}

// Row is one row of the unwind table: the rules that hold for ELF virtual
// addresses from PC up to the next row's PC.
type Row struct {
	PC          uint64
	NoCFI       bool   // no FDE covers PC: the frame-pointer rule applies
	CFAReg      int    // RegRSP or RegRBP; -1 when CFAExpr gives the CFA
	CFAOffset   int64  // CFA = CFAReg + CFAOffset
	CFAExpr     []byte // DWARF expression computing the CFA
	RA, BP      RegRule
	SP          RegRule // rsp's rule when SPRule (else rsp = CFA)
	Signal      bool    // FDE of a signal trampoline: the caller's pc is exact
	SPRule      bool    // rsp has its own rule (signal frames)
	Unsupported bool    // a rule the interpreter cannot evaluate: the walk stops
}

// Rows returns the table's rows in increasing PC order. Consecutive rows
// have different rules; a NoCFI row ends each FDE that the next one does not
// start.
func (t *Table) Rows() []Row {
	out := make([]Row, len(t.t.rows))
	for i, rw := range t.t.rows {
		r := Row{PC: rw.pc, CFAReg: int(rw.cfaReg), CFAOffset: int64(rw.cfaOff)}
		switch rw.cfaReg {
		case cfaNone:
			r = Row{PC: rw.pc, NoCFI: true}
			out[i] = r
			continue
		case cfaExpr:
			r.CFAReg, r.CFAOffset, r.CFAExpr = -1, 0, t.expr(int64(rw.cfaOff))
		}
		r.RA = t.rule(rw.raKind, rw.raOff)
		r.BP = t.rule(rw.bpKind, rw.bpOff)
		r.Signal = rw.flags&flagSignal != 0
		r.SPRule = rw.flags&flagSP != 0
		if r.SPRule {
			sp := t.t.sp[rw.pc]
			r.SP = t.rule(sp.kind, int32(sp.off))
		}
		r.Unsupported = rw.flags&flagUnsupported != 0
		out[i] = r
	}
	return out
}

func (t *Table) expr(i int64) []byte {
	if i < 0 || i >= int64(len(t.t.exprs)) {
		return nil
	}
	return t.t.exprs[i]
}

func (t *Table) rule(kind uint8, off int32) RegRule {
	r := RegRule{Kind: RuleKind(kind), Offset: int64(off)}
	if r.Kind == RuleExpr || r.Kind == RuleValExpr {
		r.Offset, r.Expr = 0, t.expr(int64(off))
	}
	return r
}

// StepResult is the outcome of Table.Step.
type StepResult uint8

// Step outcomes.
const (
	StepNext = StepResult(stepNext) // the caller's registers were computed
	StepEnd  = StepResult(stepEnd)  // outermost frame: the walk is complete
	StepStop = StepResult(stepStop) // the walk cannot continue (truncated)
)

// FrameState is the register state of a frame in a walk.
type FrameState struct {
	Regs
	BPValid bool // rbp holds a known value
	Exact   bool // IP is the exact instruction (first frame, after a signal frame)
}

// Step unwinds one frame exactly as Process.Unwind does: vaddr is the ELF
// virtual address whose rules apply (IP, or IP-1 unless Exact, minus the
// load bias), stack a copy of memory from s.SP. It returns the caller's
// state when the result is StepNext.
func (t *Table) Step(vaddr uint64, s FrameState, stack []byte) (FrameState, StepResult) {
	st := stackReader{base: s.SP, stack: stack}
	f := frame{pc: s.IP, sp: s.SP, bp: s.BP, bpValid: s.BPValid, exact: s.Exact}
	n, res := t.t.step(vaddr, f, &st)
	return FrameState{Regs: Regs{IP: n.pc, SP: n.sp, BP: n.bp}, BPValid: n.bpValid, Exact: n.exact}, StepResult(res)
}

// Bytes is the table's estimated memory in bytes.
func (t *Table) Bytes() int64 { return t.t.bytes }

// LoadBias returns the value to subtract from a pc in mapping m of object ef
// to get the ELF virtual address (from the PT_LOAD segment that maps m's
// file offset); false when no segment does.
func LoadBias(ef *elf.File, m *procmaps.Mapping) (uint64, bool) { return loadBias(ef, m) }

// ParseObject parses f, an open file of a target (name names it in
// errors), as ELF with the checks of targetfs.NewELF, a parser panic
// recovered as an error, and returns it with its ObjectKey.
func ParseObject(f *os.File, name string) (ef *elf.File, key string, err error) {
	err = targetfs.Recover(name, func() error {
		var err error
		if ef, err = targetfs.NewELF(f); err != nil {
			return err
		}
		key, err = objectKey(ef, f)
		return err
	})
	return ef, key, err
}

// ObjectKey identifies an object across processes by its GNU build ID and
// the SHA-256 of its contents (targetfs.Digest), so that a file claiming
// another tenant's build ID never shares its table. f is the open file ef
// was parsed from; errors are those of reading it.
func ObjectKey(ef *elf.File, f *os.File) (string, error) { return objectKey(ef, f) }
