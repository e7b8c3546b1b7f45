package testprog

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"testing"
)

// ELFPatch edits the headers of a 64-bit little-endian ELF image in place,
// to build the malformed objects of the hostile-input tests.
type ELFPatch struct {
	t    testing.TB
	Data []byte
	f    *elf.File
}

// NewELFPatch parses data (a copy is kept) for patching.
func NewELFPatch(t testing.TB, data []byte) *ELFPatch {
	t.Helper()
	d := append([]byte(nil), data...)
	f, err := elf.NewFile(bytes.NewReader(d))
	if err != nil {
		t.Fatalf("parse ELF: %v", err)
	}
	return &ELFPatch{t: t, Data: d, f: f}
}

// ReadELFPatch reads path for patching.
func ReadELFPatch(t testing.TB, path string) *ELFPatch {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return NewELFPatch(t, b)
}

// File is the parse of the unpatched image.
func (p *ELFPatch) File() *elf.File { return p.f }

func (p *ELFPatch) shdr(name string) int {
	p.t.Helper()
	shoff := binary.LittleEndian.Uint64(p.Data[0x28:])
	for i, s := range p.f.Sections {
		if s.Name == name {
			return int(shoff) + i*64
		}
	}
	p.t.Fatalf("no section %s", name)
	return 0
}

// Section header field offsets (Elf64_Shdr).
const (
	ShFlags  = 8
	ShOffset = 24
	ShSize   = 32
)

// SetSection sets a 64-bit field (ShFlags, ShOffset, ShSize) of section name.
func (p *ELFPatch) SetSection(name string, field int, v uint64) {
	p.t.Helper()
	binary.LittleEndian.PutUint64(p.Data[p.shdr(name)+field:], v)
}

// SectionFlags returns the flags of section name.
func (p *ELFPatch) SectionFlags(name string) uint64 {
	return binary.LittleEndian.Uint64(p.Data[p.shdr(name)+ShFlags:])
}

// SetProgFilesz sets p_filesz (and p_memsz) of the first program header of type typ.
func (p *ELFPatch) SetProgFilesz(typ elf.ProgType, v uint64) {
	p.t.Helper()
	phoff := binary.LittleEndian.Uint64(p.Data[0x20:])
	for i, pr := range p.f.Progs {
		if pr.Type == typ {
			o := int(phoff) + i*56
			binary.LittleEndian.PutUint64(p.Data[o+32:], v)
			binary.LittleEndian.PutUint64(p.Data[o+40:], v)
			return
		}
	}
	p.t.Fatalf("no %v program header", typ)
}

// SetSymbolSize sets st_size of every symbol called name in .symtab and .dynsym.
func (p *ELFPatch) SetSymbolSize(name string, v uint64) {
	p.t.Helper()
	n := 0
	for _, tab := range []struct {
		sec  string
		syms func() ([]elf.Symbol, error)
	}{{".symtab", p.f.Symbols}, {".dynsym", p.f.DynamicSymbols}} {
		syms, err := tab.syms()
		if err != nil {
			continue
		}
		off := p.f.Section(tab.sec).Offset
		for i, s := range syms {
			if s.Name == name {
				binary.LittleEndian.PutUint64(p.Data[int(off)+(i+1)*24+16:], v)
				n++
			}
		}
	}
	if n == 0 {
		p.t.Fatalf("no symbol %s", name)
	}
}

// SectionBytes returns the file bytes of section name (to patch them).
func (p *ELFPatch) SectionBytes(name string) []byte {
	p.t.Helper()
	s := p.f.Section(name)
	if s == nil {
		p.t.Fatalf("no section %s", name)
	}
	return p.Data[s.Offset : s.Offset+s.FileSize]
}

// Write writes the patched image to path.
func (p *ELFPatch) Write(path string) {
	p.t.Helper()
	if err := os.WriteFile(path, p.Data, 0o755); err != nil {
		p.t.Fatal(err)
	}
}
