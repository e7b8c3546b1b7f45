package symbolize

import (
	"encoding/binary"
	"fmt"
)

// checkLineHeader checks the DWARF line-program header at offset off of
// .debug_line (data) before Go's debug/dwarf reads it: Go allocates the
// directory and file tables of a DWARF 5 header at the counts the header
// claims (a count of 2^45 panics, 2^30 exhausts memory) before reading a
// single entry. A count is accepted only if every entry can take at least
// one byte of the header. Headers of DWARF 2-4 (NUL-terminated lists) and
// the program itself need no check.
func checkLineHeader(data []byte, off int64) error {
	if off < 0 || off >= int64(len(data)) {
		return fmt.Errorf("line table offset %#x is outside .debug_line (%d bytes)", off, len(data))
	}
	r := &lhReader{b: data, pos: int(off)}
	length := uint64(r.u32())
	offSize := 4
	if length == 0xffffffff {
		length = r.u64()
		offSize = 8
	}
	if r.err || length > uint64(len(data)-r.pos) {
		return fmt.Errorf("line table at %#x: length %d runs past .debug_line", off, length)
	}
	end := r.pos + int(length)
	r.b = data[:end]
	version := r.u16()
	if version < 5 {
		return nil
	}
	r.skip(2) // address_size, segment_selector_size
	var hlen uint64
	if offSize == 8 {
		hlen = r.u64()
	} else {
		hlen = uint64(r.u32())
	}
	if r.err || hlen > uint64(end-r.pos) {
		return fmt.Errorf("line table at %#x: header length %d runs past the table", off, hlen)
	}
	r.b = data[:r.pos+int(hlen)]
	r.skip(5) // minimum_instruction_length .. line_range
	opcodeBase := int(r.u8())
	if opcodeBase > 0 {
		r.skip(opcodeBase - 1)
	}
	for _, what := range []string{"directories", "file names"} {
		nfmt := int(r.u8())
		forms := make([]uint64, nfmt)
		for i := range forms {
			r.uleb() // content type
			forms[i] = r.uleb()
		}
		count := r.uleb()
		if r.err {
			return fmt.Errorf("line table at %#x: truncated header", off)
		}
		if count > 0 && (nfmt == 0 || count > uint64(len(r.b)-r.pos)) {
			return fmt.Errorf("line table at %#x: %d %s in a header with %d bytes left: malformed", off, count, what, len(r.b)-r.pos)
		}
		// Every entry takes at least one byte, so this loop is bounded by
		// the header's size.
		for i := uint64(0); i < count && !r.err; i++ {
			for _, f := range forms {
				if !r.skipForm(f, offSize) {
					return fmt.Errorf("line table at %#x: unexpected form %#x in the %s format", off, f, what)
				}
			}
		}
	}
	return nil
}

// lhReader reads a line-table header; err is set on any read past the end.
type lhReader struct {
	b   []byte
	pos int
	err bool
}

func (r *lhReader) skip(n int) {
	if n < 0 || n > len(r.b)-r.pos {
		r.err, r.pos = true, len(r.b)
		return
	}
	r.pos += n
}

func (r *lhReader) u8() uint8 {
	if r.pos >= len(r.b) {
		r.err = true
		return 0
	}
	v := r.b[r.pos]
	r.pos++
	return v
}

func (r *lhReader) u16() uint16 {
	if len(r.b)-r.pos < 2 {
		r.err, r.pos = true, len(r.b)
		return 0
	}
	v := binary.LittleEndian.Uint16(r.b[r.pos:])
	r.pos += 2
	return v
}

func (r *lhReader) u32() uint32 {
	if len(r.b)-r.pos < 4 {
		r.err, r.pos = true, len(r.b)
		return 0
	}
	v := binary.LittleEndian.Uint32(r.b[r.pos:])
	r.pos += 4
	return v
}

func (r *lhReader) u64() uint64 {
	if len(r.b)-r.pos < 8 {
		r.err, r.pos = true, len(r.b)
		return 0
	}
	v := binary.LittleEndian.Uint64(r.b[r.pos:])
	r.pos += 8
	return v
}

func (r *lhReader) uleb() uint64 {
	var v uint64
	var shift uint
	for {
		c := r.u8()
		if r.err {
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

// skipForm skips one attribute value of DWARF form f in a line-table
// header; false for forms not expected there. It must consume exactly what
// debug/dwarf's LineReader.readLNCT consumes, or the counts checked here are
// not those debug/dwarf allocates for: readLNCT reads nothing for a form it
// does not list (DW_FORM_sec_offset among them), so such forms are refused
// (FuzzDWARFLines found a header whose sec_offset paths made debug/dwarf
// read a file-name count of 2^37 after this check passed).
func (r *lhReader) skipForm(f uint64, offSize int) bool {
	switch f {
	case 0x08: // DW_FORM_string
		for r.pos < len(r.b) && r.b[r.pos] != 0 {
			r.pos++
		}
		r.skip(1)
	case 0x0e, 0x1f: // strp, line_strp
		r.skip(offSize)
	case 0x0f, 0x1a: // udata, strx
		r.uleb()
	case 0x25: // strx1
		r.skip(1)
	case 0x26: // strx2
		r.skip(2)
	case 0x27: // strx3
		r.skip(3)
	case 0x28: // strx4
		r.skip(4)
	case 0x0b: // data1
		r.skip(1)
	case 0x05: // data2
		r.skip(2)
	case 0x06: // data4
		r.skip(4)
	case 0x07: // data8
		r.skip(8)
	case 0x1e: // data16
		r.skip(16)
	case 0x09: // block
		n := r.uleb()
		if n > uint64(len(r.b)-r.pos) {
			r.err, r.pos = true, len(r.b)
			return true
		}
		r.skip(int(n))
	default:
		return false
	}
	return true
}
