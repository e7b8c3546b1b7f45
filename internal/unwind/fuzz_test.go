package unwind

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"
)

// Fuzz targets for the CFI parser and the DWARF expression evaluator (seed
// corpora in testdata/fuzz/; `make fuzz` runs them).

// FuzzCFI parses arbitrary bytes as .eh_frame (eh) or .debug_frame, builds
// the row table and looks up every row.
func FuzzCFI(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte, eh bool) {
		var exprs [][]byte
		p := &parser{data: data, addr: 0x1000, eh: eh, exprs: &exprs}
		fdes, _ := p.parseEntries()
		tab := buildTable(fdes, &exprs)
		if tab.bytes > 64*int64(len(data))+1<<20 {
			t.Fatalf("table of %d bytes from %d bytes of CFI", tab.bytes, len(data))
		}
		for _, r := range tab.rows {
			if got := tab.lookup(r.pc); got != nil && got.cfaReg == cfaExpr && int(got.cfaOff) >= len(tab.exprs) {
				t.Fatalf("row names expression %d of %d", got.cfaOff, len(tab.exprs))
			}
		}
	})
}

// FuzzEval evaluates arbitrary DWARF expressions against a stack copy.
func FuzzEval(f *testing.F) {
	f.Add([]byte{0x77, 0x08}, uint64(0x7ffe0000), uint64(0x7ffe0040))                   // breg7 (rsp) +8
	f.Add([]byte{0x77, 0x08, 0x06, 0x23, 0x10}, uint64(0x7ffe0000), uint64(0x7ffe0040)) // deref, plus_uconst
	f.Add([]byte{0x30, 0x28, 0xfd, 0xff, 0x2f, 0xfa, 0xff}, uint64(0), uint64(0))       // lit0, bra -3, skip -6
	f.Fuzz(func(t *testing.T, expr []byte, sp, bp uint64) {
		stack := make([]byte, 256)
		for i := 0; i < len(stack); i += 8 {
			binary.LittleEndian.PutUint64(stack[i:], sp+uint64(i))
		}
		x := &exprCtx{sp: sp, bp: bp, pc: 0x401000, bpValid: true, st: &stackReader{base: sp, stack: stack}}
		eval(expr, x, sp, true)
		eval(expr, x, 0, false)
	})
}

// FuzzNoteBuildID parses arbitrary note bytes for a GNU build ID.
func FuzzNoteBuildID(f *testing.F) {
	f.Add([]byte("\x04\x00\x00\x00\x14\x00\x00\x00\x03\x00\x00\x00GNU\x00" + string(bytes.Repeat([]byte{1}, 20))))
	f.Fuzz(func(t *testing.T, data []byte) {
		noteBuildID(data)
	})
}

// FuzzParseTable reads CFI and build ID from arbitrary ELF images.
func FuzzParseTable(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		ef, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			return
		}
		BuildID(ef)
		parseTable(ef)
	})
}
