package symbolize

import (
	"bytes"
	"debug/dwarf"
	"encoding/binary"
	"io"
	"testing"
)

// Fuzz targets for what symbolize reads from a target's files. Seed
// corpora are committed under testdata/fuzz/<Target>/; `make fuzz` runs
// each for FUZZTIME. A panic here is a bug even though production runs
// these under targetfs.Guard.

// FuzzLoadObject: ELF object loading, symbols, build ID, debuglink, DWARF
// tables and lookups on arbitrary bytes.
func FuzzLoadObject(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		r := io.NewSectionReader(bytes.NewReader(data), 0, int64(len(data)))
		o, err := loadObject(objKey{}, r, nil, "fuzz")
		if err != nil {
			return
		}
		ef, err := newELF(r)
		if err != nil {
			t.Fatalf("loadObject accepted what newELF refuses: %v", err)
		}
		readBuildID(ef)
		debugLink(ef)
		var tabs *dwTables
		if o.hasDW {
			tabs, _ = readDWARF(r)
		}
		for _, s := range o.syms {
			o.lines(s.addr, tabs)
			o.lines(s.addr+s.size/2, tabs)
		}
		for _, seg := range o.segs {
			o.fileToVaddr(seg.off)
		}
	})
}

// FuzzDWARFLines: line tables and function trees from arbitrary
// .debug_abbrev, .debug_info, .debug_line and string sections.
func FuzzDWARFLines(f *testing.F) {
	f.Fuzz(func(t *testing.T, abbrev, info, line, str, lineStr []byte) {
		d, err := dwarf.New(abbrev, nil, nil, info, line, nil, nil, str)
		if err != nil {
			return
		}
		if len(lineStr) > 0 {
			if err := d.AddSection(".debug_line_str", lineStr); err != nil {
				return
			}
		}
		tabs, err := buildTables(d, line, uint64(len(abbrev)+len(info)+len(line)+len(str)+len(lineStr)))
		if err != nil || tabs == nil {
			return
		}
		if uint64(len(tabs.rows)) > uint64(len(line))+1 {
			t.Fatalf("%d rows from %d bytes of .debug_line", len(tabs.rows), len(line))
		}
		for _, r := range tabs.rows {
			tabs.lookupLine(r.addr)
			tabs.lookupFuncs(r.addr)
		}
	})
}

// FuzzLineHeader: the DWARF 5 line-header check on arbitrary bytes.
func FuzzLineHeader(f *testing.F) {
	f.Add([]byte{0x20, 0, 0, 0, 5, 0, 8, 0, 0x10, 0, 0, 0, 1, 1, 1, 0xfb, 14, 1, 1, 1, 0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x08}, int64(0))
	f.Fuzz(func(t *testing.T, data []byte, off int64) {
		checkLineHeader(data, off)
	})
}

// FuzzNotes: GNU build-ID notes.
func FuzzNotes(f *testing.F) {
	note := binary.LittleEndian.AppendUint32(nil, 4)
	note = binary.LittleEndian.AppendUint32(note, 20)
	note = binary.LittleEndian.AppendUint32(note, ntGNUBuildID)
	note = append(note, "GNU\x00"...)
	note = append(note, bytes.Repeat([]byte{0xab}, 20)...)
	f.Add(note)
	f.Fuzz(func(t *testing.T, data []byte) {
		buildIDFromNotes(bytes.NewReader(data), binary.LittleEndian)
	})
}
