package unwind

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/targetfs"
	"github.com/memprof/memprof/internal/testprog"
)

// uleb appends v as ULEB128.
func uleb(b []byte, v uint64) []byte {
	for {
		c := byte(v & 0x7f)
		v >>= 7
		if v != 0 {
			b = append(b, c|0x80)
			continue
		}
		return append(b, c)
	}
}

// ehCIE is a version-1 CIE without augmentation (FDE pointers are absolute
// 8-byte values): CFA = rsp+8, return address at CFA-8, then extra
// initial instructions.
func ehCIE(extra []byte) []byte {
	body := []byte{0, 0, 0, 0, 1, 0} // CIE id 0, version 1, augmentation ""
	body = uleb(body, 1)             // code alignment
	body = append(body, 0x78)        // data alignment -8
	body = append(body, 16)          // return address register
	body = append(body, 0x0c, 7, 8)  // def_cfa rsp+8
	body = append(body, 0x90, 1)     // offset rip at cfa-8
	body = append(body, extra...)
	for len(body)%8 != 4 {
		body = append(body, 0) // nops
	}
	return append(binary.LittleEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// ehFDE is an FDE at section offset off for the CIE at cieOff.
func ehFDE(off, cieOff int, begin, size uint64) []byte {
	body := binary.LittleEndian.AppendUint32(nil, uint32(off+4-cieOff))
	body = binary.LittleEndian.AppendUint64(body, begin)
	body = binary.LittleEndian.AppendUint64(body, size)
	return append(binary.LittleEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// TestSharedCIEExpression: one CIE with a 256 KiB expression shared by 20k
// FDEs (a 730 KiB section) must store the expression once, not per FDE
// (which made 256 KiB of input cost 685 MiB).
func TestSharedCIEExpression(t *testing.T) {
	expr := bytes.Repeat([]byte{0x96}, 256<<10)  // DW_OP_nop
	ins := uleb([]byte{0x0f}, uint64(len(expr))) // def_cfa_expression
	ins = append(ins, expr...)
	data := ehCIE(ins)
	const n = 20000
	for i := 0; i < n; i++ {
		data = append(data, ehFDE(len(data), 0, 0x1000+uint64(i)*16, 16)...)
	}
	data = append(data, 0, 0, 0, 0)
	start := time.Now()
	var exprs [][]byte
	p := &parser{data: data, eh: true, exprs: &exprs}
	fdes, err := p.parseEntries()
	if err != nil {
		t.Fatal(err)
	}
	tab := buildTable(fdes, &exprs)
	t.Logf("%d FDEs, section %d KiB: table %d KiB, %d expressions, in %v", len(fdes), len(data)>>10, tab.bytes>>10, len(tab.exprs), time.Since(start))
	if len(fdes) != n || tab.fdes != n {
		t.Fatalf("parsed %d FDEs, table has %d, want %d", len(fdes), tab.fdes, n)
	}
	if len(tab.exprs) != 1 {
		t.Errorf("%d expressions stored, want 1 (shared by every FDE)", len(tab.exprs))
	}
	if tab.bytes > 4*int64(len(data)) {
		t.Errorf("table of %d bytes for a %d-byte section: expression copied per FDE?", tab.bytes, len(data))
	}
	if r := tab.lookup(0x1000 + 5*16 + 3); r == nil || r.cfaReg != cfaExpr {
		t.Errorf("row at an FDE: %+v, want the CIE's CFA expression", r)
	}
}

// TestCIE64BitLength: a .debug_frame FDE naming, after it, a CIE whose
// 64-bit length is huge must not panic (cieAt sliced past the section).
func TestCIE64BitLength(t *testing.T) {
	for _, length := range []uint64{1 << 62, ^uint64(0) - 2, 1<<63 + 5, 40} {
		// FDE (32-bit) pointing at offset 24, where the CIE starts.
		fde := binary.LittleEndian.AppendUint32(nil, 20)
		fde = binary.LittleEndian.AppendUint32(fde, 24) // CIE pointer (section offset)
		fde = binary.LittleEndian.AppendUint64(fde, 0x1000)
		fde = binary.LittleEndian.AppendUint64(fde, 0x10)
		cie := binary.LittleEndian.AppendUint32(nil, 0xffffffff)
		cie = binary.LittleEndian.AppendUint64(cie, length)
		cie = binary.LittleEndian.AppendUint64(cie, ^uint64(0)) // CIE id
		cie = append(cie, 4, 0, 8, 0, 1, 0x78, 16)
		data := append(fde, cie...)
		var exprs [][]byte
		p := &parser{data: data, eh: false, exprs: &exprs}
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("length %#x: panic %v", length, r)
				}
			}()
			p.parseEntries()
			p.cieAt(24)
		}()
	}
}

// TestHostileELF: malformed headers are refused or read within bounds by
// BuildID and parseTable, without panics.
func TestHostileELF(t *testing.T) {
	lib := testprog.Build(t, "unw_lib.c", "-shared", "-fPIC")
	t.Run("pt_note-2^50", func(t *testing.T) {
		p := testprog.ReadELFPatch(t, lib)
		p.SetProgFilesz(elf.PT_NOTE, 1<<50)
		ef, err := elf.NewFile(bytes.NewReader(p.Data))
		if err != nil {
			t.Fatal(err)
		}
		if err := targetfs.CheckELF(ef, int64(len(p.Data))); err == nil {
			t.Error("CheckELF accepted a PT_NOTE past the end of the file")
		}
		BuildID(ef) // must not allocate 2^50 bytes
	})
	t.Run("eh_frame-2^35", func(t *testing.T) {
		p := testprog.ReadELFPatch(t, lib)
		p.SetSection(".eh_frame", testprog.ShSize, 1<<35)
		ef, err := elf.NewFile(bytes.NewReader(p.Data))
		if err != nil {
			t.Fatal(err)
		}
		_, err = parseTable(ef)
		if !errors.Is(err, targetfs.ErrTooLarge) {
			t.Errorf("parseTable error %v, want the CFI size limit", err)
		}
	})
	t.Run("compressed-eh_frame", func(t *testing.T) {
		p := testprog.ReadELFPatch(t, lib)
		p.SetSection(".eh_frame", testprog.ShFlags, p.SectionFlags(".eh_frame")|uint64(elf.SHF_COMPRESSED))
		ef, err := elf.NewFile(bytes.NewReader(p.Data))
		if err != nil {
			return // refused at parse: fine
		}
		if _, err := parseTable(ef); err != nil && !strings.Contains(err.Error(), "eh_frame") {
			t.Errorf("error %v does not name the section", err)
		}
	})
}
