package attach

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// Site is where one allocator function is probed.
type Site struct {
	Symbol     string   // the function's most common name among its aliases (C before family before C++)
	Aliases    []string // the other allocator names at the same address (free: cfree, tc_free, _ZdlPv, ...)
	Family     string   // "tcmalloc", "mimalloc" or "jemalloc" when a name is that family's own API (tc_*, mi_*, <prefix>malloc)
	Kind       Kind
	FileOffset uint64 // file offset of the function's first byte
	Size       uint64
	Offset     uint64 // probe offset from the function start
	Emulated   bool   // the kernel emulates the instruction at the probe (no single-step)
	Thunk      bool   // the function only jumps elsewhere: not probed
	Insn       string // the instruction at the probe, for reports
	// RetSites: the call's result is taken by probes on the function's ret
	// instructions (Rets), never by a return probe, which would replace the
	// return address on the stack and break C++ exceptions thrown through
	// the function (operator new's std::bad_alloc). See MayThrow.
	RetSites bool
	// Rets are the file offsets of the ret instructions where a call of the
	// function returns (its own and those of code it jumps to); probed for
	// RetSites functions.
	Rets []uint64
	// Tails are the file offsets of jmp instructions by which the function
	// hands its call over to another allocator function (glibc realloc(NULL,
	// n) -> malloc): probed so that the callee's entry is known to continue
	// the call rather than abandon it.
	Tails []uint64
	// RetsIncomplete: some path out of a RetSites function could not be
	// followed (an indirect jump): calls leaving by it are counted as
	// abandoned.
	RetsIncomplete bool
	// Forwards: a RetSites function that forwards its allocation to an
	// allocator entry point it calls through the PLT and keeps rbp (see
	// forwards). In an object whose operator new is known to do only that
	// (libstdc++: see Object.Forwarding) it is probed at its entry only and
	// the callee's return records the block; Rets are not probed.
	Forwards bool
}

// FindSites lists the allocator functions an ELF object defines, one per
// code address (aliases such as malloc/__libc_malloc share one probe), with
// the probe offset chosen for each.
func FindSites(f *elf.File) ([]Site, error) {
	if f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("unsupported ELF machine %v: memprof probes x86-64 code", f.Machine)
	}
	var syms []elf.Symbol
	if s, err := f.DynamicSymbols(); err == nil {
		syms = append(syms, s...)
	}
	if s, err := f.Symbols(); err == nil {
		syms = append(syms, s...)
	}
	defined := map[string]bool{}
	for _, s := range syms {
		if elf.ST_TYPE(s.Info) == elf.STT_FUNC && s.Section != elf.SHN_UNDEF && s.Value != 0 {
			defined[symName(s.Name)] = true
		}
	}
	names := newNamer(defined)
	byAddr := map[uint64]*Site{}
	for _, s := range syms {
		if elf.ST_TYPE(s.Info) != elf.STT_FUNC && elf.ST_TYPE(s.Info) != elf.STT_GNU_IFUNC {
			continue
		}
		if s.Section == elf.SHN_UNDEF || s.Value == 0 {
			continue
		}
		name := symName(s.Name)
		kind, fam, ok := names.kind(name)
		if !ok {
			continue
		}
		if elf.ST_TYPE(s.Info) == elf.STT_GNU_IFUNC {
			// An IFUNC resolver is not the function; skip rather than probe it.
			continue
		}
		if prev, dup := byAddr[s.Value]; dup {
			prev.addAlias(name, kind, fam)
			continue
		}
		off, err := fileOffset(f, s.Value)
		if err != nil {
			continue
		}
		byAddr[s.Value] = &Site{Symbol: name, Kind: kind, Family: fam, FileOffset: off, Size: s.Size, RetSites: MayThrow(name)}
	}
	text := newTextReader(f)
	allocFn := func(target uint64) bool {
		_, ok := byAddr[target]
		return ok || inPLT(f, target)
	}
	var out []Site
	for vaddr, site := range byAddr {
		code, err := functionBytes(f, vaddr, site.Size)
		if err != nil {
			return nil, fmt.Errorf("read code of %s: %w", site.Symbol, err)
		}
		chooseOffset(site, code, func(rel int64) bool {
			return allocFn(uint64(int64(vaddr) + rel))
		})
		if !site.Thunk {
			rets, tails, complete := returns(text, vaddr, allocFn)
			for _, t := range tails {
				if o, err := fileOffset(f, t); err == nil {
					site.Tails = append(site.Tails, o)
				}
			}
			if site.Kind.Returns() {
				for _, r := range rets {
					if o, err := fileOffset(f, r); err == nil {
						site.Rets = append(site.Rets, o)
					}
				}
				site.RetsIncomplete = !complete
			}
			if site.RetSites && !site.RetsIncomplete {
				site.Forwards = forwards(text, vaddr, allocFn)
			}
		}
		out = append(out, *site)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Symbol < out[j].Symbol })
	return out, nil
}

// addAlias records another name of the site's function. The most common
// name (nameRank: free before cfree, tc_free or _ZdlPv; the lexically
// smallest among equals, for stable output) becomes the site's Symbol, and
// decides its kind; the others are kept in Aliases, so that whoever
// classifies the object sees every name it exports (tcmalloc's and
// mimalloc's free is also tc_free/mi_free, cfree and operator delete).
func (s *Site) addAlias(name string, kind Kind, fam string) {
	if name == s.Symbol || slices.Contains(s.Aliases, name) {
		return
	}
	if fam != "" && s.Family == "" {
		s.Family = fam
	}
	// One name that may throw (tcmalloc's tc_new is also _Znwm) makes the
	// function's result be taken at its ret instructions.
	s.RetSites = s.RetSites || MayThrow(name)
	if r, pr := nameRank(name), nameRank(s.Symbol); r < pr || (r == pr && name < s.Symbol) {
		s.Aliases = append(s.Aliases, s.Symbol)
		s.Symbol, s.Kind = name, kind
	} else {
		s.Aliases = append(s.Aliases, name)
	}
	sort.Strings(s.Aliases)
}

// Names lists every allocator name of the site's function, Symbol first.
func (s *Site) Names() []string { return append([]string{s.Symbol}, s.Aliases...) }

// symName drops a symbol version suffix (name@VERSION) some tools add.
func symName(name string) string {
	if i := indexByte(name, '@'); i >= 0 {
		return name[:i]
	}
	return name
}

func indexByte(s string, b byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == b {
			return i
		}
	}
	return -1
}

// fileOffset converts a virtual address of the object to a file offset
// through its loadable segments.
func fileOffset(f *elf.File, vaddr uint64) (uint64, error) {
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && vaddr >= p.Vaddr && vaddr < p.Vaddr+p.Filesz {
			return vaddr - p.Vaddr + p.Off, nil
		}
	}
	return 0, fmt.Errorf("address %#x is in no executable segment", vaddr)
}

func functionBytes(f *elf.File, vaddr, size uint64) ([]byte, error) {
	compressed := ""
	for _, s := range f.Sections {
		if s.Type != elf.SHT_PROGBITS || s.Flags&elf.SHF_EXECINSTR == 0 {
			continue
		}
		if vaddr < s.Addr || vaddr-s.Addr >= s.Size {
			continue
		}
		if !readableCode(s) {
			compressed = s.Name // see readableCode; another section may hold vaddr
			continue
		}
		// Read at most maxFunctionBytes: a symbol's size is the target's
		// word (2^50 in a hostile file) and only the prefix matters.
		if room := s.Size - (vaddr - s.Addr); size == 0 || size > room {
			size = room
		}
		size = min(size, maxFunctionBytes)
		buf := make([]byte, size)
		if _, err := s.ReadAt(buf, int64(vaddr-s.Addr)); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		return buf, nil
	}
	if compressed != "" {
		return nil, fmt.Errorf("code section %s is compressed", compressed)
	}
	return nil, fmt.Errorf("address %#x is in no code section", vaddr)
}

// maxFunctionBytes bounds the code read per allocator function: the probe
// search looks at the first maxPrefix bytes and the branches of a function
// of ordinary size.
const maxFunctionBytes = 64 << 10

// maxPrefix bounds how far into a function the probe may move.
const maxPrefix = 64

// chooseOffset places the probe on the first instruction of the function's
// straight-line prefix that the x86 kernel emulates (push reg, jmp/call
// rel, jcc rel): any other instruction is single-stepped out of line, a
// second trap that costs ~14x more in a VM (field notes: glibc free+0
// 10,600 ns vs free+3 750 ns). The instructions skipped must not touch the
// argument registers the entry program reads, nor the stack pointer, so that
// at the probe the arguments are intact and [rsp] still holds the return
// address the return probe hijacks. No branch elsewhere in the function may
// land inside the skipped prefix, or the probe would fire twice for a call.
//
// A function that only tail-jumps to another allocator function (jemalloc's
// and libstdc++'s operator delete are `jmp free@plt`) is not probed: its
// target is, and one probe per call is enough. probed tells whether a jump
// offset from the function start lands on a probed function or a PLT stub.
func chooseOffset(s *Site, code []byte, probed func(rel int64) bool) {
	if t, ok := tailJump(code); ok && probed(t) {
		s.Thunk = true
		s.Insn = "jmp"
		return
	}
	regs := s.Kind.argRegs()
	pos := 0
	for pos < maxPrefix && pos < len(code) {
		if isEndbr64(code[pos:]) {
			pos += 4
			continue
		}
		inst, err := x86asm.Decode(code[pos:], 64)
		if err != nil {
			break
		}
		if emulated(code[pos : pos+inst.Len]) {
			if pos == 0 || !branchesInto(code, pos) {
				s.Offset = uint64(pos)
				s.Emulated = true
				s.Insn = inst.String()
				return
			}
			break
		}
		if !harmless(inst, code[pos:pos+inst.Len], regs) {
			break
		}
		pos += inst.Len
	}
	// No emulated instruction reachable: probe the entry (single-stepped).
	s.Offset = 0
	if inst, err := x86asm.Decode(code, 64); err == nil {
		s.Insn = inst.String()
		s.Emulated = emulated(code[:inst.Len])
	}
}

// emulated reports whether the kernel's x86 uprobe code emulates the
// instruction instead of single-stepping it: push of a register, call/jmp
// with a relative target, conditional jumps with a relative target, with no
// prefix other than REX (arch/x86/kernel/uprobes.c: branch_setup_xol_ops,
// push_setup_xol_ops).
func emulated(raw []byte) bool {
	if len(raw) == 0 {
		return false
	}
	b := raw
	rex := false
	if b[0]&0xf0 == 0x40 {
		rex = true
		b = b[1:]
	}
	if len(b) == 0 {
		return false
	}
	switch {
	case b[0] >= 0x50 && b[0] <= 0x57: // push r64
		return len(b) == 1
	case b[0] == 0xe8 || b[0] == 0xe9 || b[0] == 0xeb: // call/jmp rel
		return !rex
	case b[0] >= 0x70 && b[0] <= 0x7f: // jcc rel8
		return !rex
	case b[0] == 0x0f && len(b) > 1 && b[1] >= 0x80 && b[1] <= 0x8f: // jcc rel32
		return !rex
	}
	return false
}

// harmless reports whether skipping the instruction keeps the argument
// registers and the stack pointer as they were at entry and does not branch.
func harmless(inst x86asm.Inst, raw []byte, args []string) bool {
	switch inst.Op {
	case x86asm.CMP, x86asm.TEST:
		return true // flags only
	case x86asm.NOP:
		return true
	case x86asm.MOV, x86asm.MOVZX, x86asm.MOVSX, x86asm.MOVSXD, x86asm.LEA,
		x86asm.ADD, x86asm.SUB, x86asm.AND, x86asm.OR, x86asm.XOR,
		x86asm.SHL, x86asm.SHR, x86asm.SAR, x86asm.MOVQ, x86asm.MOVD:
	default:
		return false
	}
	switch dst := inst.Args[0].(type) {
	case x86asm.Reg:
		full := fullReg(dst)
		if full == "RSP" {
			return false
		}
		for _, a := range args {
			if a == full {
				return false
			}
		}
		return true
	case x86asm.Mem:
		// A store through the stack pointer could overwrite the return address.
		return dst.Base != x86asm.RSP && dst.Base != x86asm.ESP
	}
	return false
}

// tailJump returns the target offset (from the function start) when the
// function is nothing but an optional endbr64 and a relative jmp.
func tailJump(code []byte) (int64, bool) {
	pos := 0
	if isEndbr64(code) {
		pos = 4
	}
	if len(code) < pos+2 {
		return 0, false
	}
	inst, err := x86asm.Decode(code[pos:], 64)
	if err != nil || inst.Op != x86asm.JMP {
		return 0, false
	}
	rel, ok := inst.Args[0].(x86asm.Rel)
	if !ok {
		return 0, false
	}
	return int64(pos+inst.Len) + int64(rel), true
}

// inPLT reports whether vaddr is in a PLT section of the object.
func inPLT(f *elf.File, vaddr uint64) bool {
	for _, s := range f.Sections {
		if strings.HasPrefix(s.Name, ".plt") && vaddr >= s.Addr && vaddr < s.Addr+s.Size {
			return true
		}
	}
	return false
}

func isEndbr64(b []byte) bool {
	return len(b) >= 4 && b[0] == 0xf3 && b[1] == 0x0f && b[2] == 0x1e && b[3] == 0xfa
}

// fullReg names the 64-bit register a register operand is part of.
func fullReg(r x86asm.Reg) string {
	switch {
	case r >= x86asm.AL && r <= x86asm.R15B:
		return [...]string{"RAX", "RCX", "RDX", "RBX", "AH", "CH", "DH", "BH", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"}[r-x86asm.AL]
	case r >= x86asm.AX && r <= x86asm.R15W:
		return [...]string{"RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"}[r-x86asm.AX]
	case r >= x86asm.EAX && r <= x86asm.R15L:
		return [...]string{"RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"}[r-x86asm.EAX]
	case r >= x86asm.RAX && r <= x86asm.R15:
		return r.String()
	}
	return r.String()
}

// branchesInto reports whether any relative branch in the function targets
// an offset in (0, site]: decoding the whole function linearly.
func branchesInto(code []byte, site int) bool {
	pos := 0
	for pos < len(code) {
		inst, err := x86asm.Decode(code[pos:], 64)
		if err != nil {
			pos++
			continue
		}
		if rel, ok := inst.Args[0].(x86asm.Rel); ok {
			target := pos + inst.Len + int(rel)
			if target > 0 && target <= site {
				return true
			}
		}
		pos += inst.Len
	}
	return false
}
