package attach

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// maxExplore bounds the instructions decoded from one function's entry
// when looking for its returns.
const maxExplore = 4096

// textReader reads code bytes of an object by virtual address, 4 KiB at a
// time, from its executable sections.
type textReader struct {
	f     *elf.File
	pages map[uint64][]byte
	got   map[uint64]string // GOT slot -> symbol name (.rela.plt, .rela.dyn)
}

func newTextReader(f *elf.File) *textReader {
	return &textReader{f: f, pages: map[uint64][]byte{}}
}

// noReturn lists functions that never return to their caller: a path that
// calls one through the PLT ends there.
var noReturn = map[string]bool{
	"__cxa_throw": true, "__cxa_rethrow": true, "_Unwind_Resume": true, "abort": true,
	"__stack_chk_fail": true, "__assert_fail": true, "exit": true, "_exit": true,
	"_ZSt9terminatev": true, "__cxa_call_terminate": true, "__cxa_bad_array_new_length": true,
	"__fortify_fail": true, "__chk_fail": true, "pthread_exit": true,
	"longjmp": true, "siglongjmp": true, "_longjmp": true, "__longjmp_chk": true,
	"__cxa_pure_virtual": true, "__cxa_bad_cast": true, "__cxa_bad_typeid": true,
}

func isNoReturn(name string) bool {
	// std::__throw_bad_alloc() and its kin (_ZSt17__throw_bad_allocv).
	return noReturn[name] || strings.HasPrefix(name, "_ZSt") && strings.Contains(name, "__throw_")
}

// pltName names the function a PLT stub at vaddr jumps to ("" when
// unknown): the stub's jmp *[rip+disp] reads a GOT slot that a dynamic
// relocation binds to a symbol.
func (r *textReader) pltName(vaddr uint64) string {
	if r.got == nil {
		r.got = gotSymbols(r.f)
	}
	pc := vaddr
	for i := 0; i < 3; i++ {
		b := r.at(pc)
		if len(b) == 0 {
			return ""
		}
		if isEndbr64(b) {
			pc += 4
			continue
		}
		inst, err := x86asm.Decode(b, 64)
		if err != nil {
			return ""
		}
		if inst.Op == x86asm.JMP {
			if m, ok := inst.Args[0].(x86asm.Mem); ok && m.Base == x86asm.RIP {
				return r.got[uint64(int64(pc)+int64(inst.Len)+m.Disp)]
			}
			return ""
		}
		pc += uint64(inst.Len)
	}
	return ""
}

// gotSymbols maps GOT slots to the dynamic symbols their relocations bind.
func gotSymbols(f *elf.File) map[uint64]string {
	out := map[uint64]string{}
	syms, err := f.DynamicSymbols()
	if err != nil {
		return out
	}
	for _, s := range f.Sections {
		if s.Type != elf.SHT_RELA || s.Size > 64<<20 { //nolint:misspell // ELF SHT_RELA
			continue
		}
		data, err := s.Data()
		if err != nil {
			continue
		}
		for i := 0; i+24 <= len(data); i += 24 {
			off := binary.LittleEndian.Uint64(data[i:])
			info := binary.LittleEndian.Uint64(data[i+8:])
			idx := info >> 32
			typ := elf.R_X86_64(info & 0xffffffff)
			if typ != elf.R_X86_64_JMP_SLOT && typ != elf.R_X86_64_GLOB_DAT {
				continue
			}
			if idx == 0 || idx > uint64(len(syms)) {
				continue
			}
			out[off] = syms[idx-1].Name
		}
	}
	return out
}

// at returns up to 16 bytes at vaddr (fewer at the end of a section), nil
// outside executable sections.
func (r *textReader) at(vaddr uint64) []byte {
	page := vaddr &^ 4095
	buf, ok := r.pages[page]
	if !ok {
		buf = r.readPage(page)
		if len(r.pages) < 4096 { // bound the cache: 16 MiB
			r.pages[page] = buf
		}
	}
	off := vaddr - page
	if off >= uint64(len(buf)) {
		return nil
	}
	end := min(off+16, uint64(len(buf)))
	b := buf[off:end]
	if len(b) < 16 && end == 4096 {
		// An instruction crossing into the next page.
		next := r.at(page + 4096)
		b = append(append([]byte(nil), b...), next...)
		if len(b) > 16 {
			b = b[:16]
		}
	}
	return b
}

// readableCode reports whether s is a code section whose bytes can be read
// in place. debug/elf gives a compressed section (SHF_COMPRESSED) no
// ReaderAt; code is never compressed in a loadable object, so such a section
// in a target's file is hostile or corrupt and is treated as no code.
func readableCode(s *elf.Section) bool {
	return s.Type == elf.SHT_PROGBITS && s.Flags&elf.SHF_EXECINSTR != 0 &&
		s.Flags&elf.SHF_COMPRESSED == 0 && s.ReaderAt != nil
}

// readPage reads the code bytes of [page, page+4096) from the executable
// sections in it; bytes outside them are zero (never decoded: addresses come
// from symbols and branches into code).
func (r *textReader) readPage(page uint64) []byte {
	buf := make([]byte, 4096)
	end := uint64(0)
	for _, s := range r.f.Sections {
		if !readableCode(s) || s.Size > math.MaxUint64-s.Addr || page > math.MaxUint64-4096 {
			continue // a section or page wrapping the address space: hostile
		}
		if page+4096 <= s.Addr || page >= s.Addr+s.Size {
			continue
		}
		lo := max(page, s.Addr)
		hi := min(page+4096, s.Addr+s.Size)
		if _, err := s.ReadAt(buf[lo-page:hi-page], int64(lo-s.Addr)); err != nil && !errors.Is(err, io.EOF) {
			continue
		}
		end = max(end, hi-page)
	}
	return buf[:end]
}

func (r *textReader) inPLT(vaddr uint64) bool { return inPLT(r.f, vaddr) }

// inText reports whether vaddr is in an executable section.
func (r *textReader) inText(vaddr uint64) bool {
	for _, s := range r.f.Sections {
		if readableCode(s) && vaddr >= s.Addr && vaddr-s.Addr < s.Size {
			return true
		}
	}
	return false
}

// returns finds where a call of the function at start leaves it with the
// caller's return address at [rsp]: its ret instructions, and those of the
// code it jumps to (cold parts, shared slow paths: a tail jump returns on
// the callee's ret), following every branch from the entry; and its tail
// jumps to other allocator functions (tail tells those: probed functions
// and PLT stubs), which return for it. complete is false when some path
// could not be followed (an indirect jump, undecodable bytes, the
// instruction budget): those paths' returns are missed.
//
// Paths continue after a call, except a call through the PLT of a function
// that never returns (__cxa_throw, std::__throw_bad_alloc): decoding past it
// would wander into unrelated code, whose ret instructions would never match
// a pending call but would trap on every call of that code.
func returns(r *textReader, start uint64, tail func(vaddr uint64) bool) (rets, tails []uint64, complete bool) {
	return walk(r, start, tail, nil)
}

// walk is returns, calling visit (when not nil) with each instruction on
// the paths followed.
func walk(r *textReader, start uint64, tail func(vaddr uint64) bool, visit func(pc uint64, inst x86asm.Inst)) (rets, tails []uint64, complete bool) {
	complete = true
	seen := map[uint64]bool{}
	work := []uint64{start}
	n := 0
	for len(work) > 0 {
		pc := work[len(work)-1]
		work = work[:len(work)-1]
	run:
		for !seen[pc] {
			if n >= maxExplore {
				return rets, tails, false
			}
			seen[pc] = true
			n++
			b := r.at(pc)
			if len(b) == 0 {
				complete = false
				break
			}
			if isEndbr64(b) {
				pc += 4
				continue
			}
			inst, err := x86asm.Decode(b, 64)
			if err != nil {
				complete = false
				break
			}
			next := pc + uint64(inst.Len)
			if visit != nil {
				visit(pc, inst)
			}
			switch inst.Op {
			case x86asm.CALL:
				if rel, ok := inst.Args[0].(x86asm.Rel); ok {
					target := uint64(int64(next) + int64(rel))
					if r.inPLT(target) && isNoReturn(r.pltName(target)) {
						break run
					}
				}
			case x86asm.RET:
				rets = append(rets, pc)
				break run
			case x86asm.UD1, x86asm.UD2, x86asm.HLT, x86asm.INT:
				break run
			case x86asm.JMP:
				rel, ok := inst.Args[0].(x86asm.Rel)
				if !ok {
					complete = false // jmp *reg or *mem
					break run
				}
				target := uint64(int64(next) + int64(rel))
				if target != start && tail(target) {
					tails = append(tails, pc)
					break run
				}
				if !r.inText(target) {
					complete = false
					break run
				}
				pc = target
				continue
			}
			if isCondJump(inst.Op) {
				if rel, ok := inst.Args[0].(x86asm.Rel); ok {
					target := uint64(int64(next) + int64(rel))
					if r.inText(target) {
						work = append(work, target)
					} else {
						complete = false
					}
				}
			}
			pc = next
		}
	}
	return rets, tails, complete
}

func isCondJump(op x86asm.Op) bool {
	switch op {
	case x86asm.JA, x86asm.JAE, x86asm.JB, x86asm.JBE, x86asm.JE, x86asm.JNE,
		x86asm.JG, x86asm.JGE, x86asm.JL, x86asm.JLE, x86asm.JO, x86asm.JNO,
		x86asm.JP, x86asm.JNP, x86asm.JS, x86asm.JNS,
		x86asm.JCXZ, x86asm.JECXZ, x86asm.JRCXZ, x86asm.LOOP, x86asm.LOOPE, x86asm.LOOPNE:
		return true
	}
	return false
}

// forwards reports whether the function at start forwards its allocation
// to another allocator entry point it calls through the PLT (libstdc++'s
// operator new: malloc, or aligned_alloc, in a new_handler loop; its
// nothrow variants: operator new), on the paths that lead to its ret
// instructions, which must all be found, and never writes rbp: the block's
// stack is taken at the callee's return, from inside the function, where a
// frame-pointer walk must still find its caller's frame through rbp. The
// BPF side then records the block at the callee's return (P_FORWARD).
func forwards(r *textReader, start uint64, tail func(vaddr uint64) bool) bool {
	calls, keepsBP := false, true
	rets, tails, complete := walk(r, start, tail, func(pc uint64, inst x86asm.Inst) {
		if writesRBP(inst) {
			keepsBP = false
		}
		if inst.Op != x86asm.CALL {
			return
		}
		rel, ok := inst.Args[0].(x86asm.Rel)
		if !ok {
			return
		}
		target := uint64(int64(pc) + int64(inst.Len) + int64(rel))
		if !r.inPLT(target) {
			return
		}
		if k, ok := KindOf(r.pltName(target)); ok && k != Free {
			calls = true
		}
	})
	return complete && calls && keepsBP && len(rets) > 0 && len(tails) == 0
}

// writesRBP reports whether an instruction may change rbp (calls preserve
// it: it is callee-saved).
func writesRBP(inst x86asm.Inst) bool {
	switch inst.Op {
	case x86asm.PUSH, x86asm.CMP, x86asm.TEST, x86asm.CALL, x86asm.JMP, x86asm.RET, x86asm.NOP:
		return false
	case x86asm.LEAVE, x86asm.ENTER:
		return true
	}
	for i, a := range inst.Args {
		if a == nil {
			break
		}
		reg, ok := a.(x86asm.Reg)
		if !ok || fullReg(reg) != "RBP" {
			continue
		}
		// The first operand is the destination; xchg and xadd write both.
		if i == 0 || inst.Op == x86asm.XCHG || inst.Op == x86asm.XADD || inst.Op == x86asm.CMPXCHG {
			return true
		}
	}
	return false
}
