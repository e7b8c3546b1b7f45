package unwindtable

import (
	"debug/elf"
	"encoding/binary"
	"path/filepath"
	"testing"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// Build flags of the fixtures (the modes internal/unwind's tests use).
var (
	omitFP  = []string{"-O2", "-fomit-frame-pointer"}
	keepFP  = []string{"-O2", "-fno-omit-frame-pointer"}
	dwarfFP = []string{"-O2", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"}
	noCFI   = []string{"-O2", "-fno-omit-frame-pointer", "-g0", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"}
)

func buildLib(t testing.TB, flags []string) string {
	return testprog.Build(t, "unw_lib.c", append(flags, "-shared", "-fPIC")...)
}

// fixtures returns the objects the table tests run on: the test library in
// every CFI mode, the test program, a C++ program, and the system's libc and
// dynamic loader (the largest objects every target maps).
func fixtures(t *testing.T) map[string]string {
	lib := buildLib(t, omitFP)
	objs := map[string]string{
		"lib-omit-fp":  lib,
		"lib-keep-fp":  buildLib(t, keepFP),
		"lib-dwarf":    buildLib(t, dwarfFP),
		"lib-no-cfi":   buildLib(t, noCFI),
		"chain-omitfp": testprog.Build(t, "unw_chain.c", append(omitFP, "-Wl,--no-as-needed", lib)...),
		"cxx-omitfp":   testprog.Build(t, "unw_cxx.cc", omitFP...),
		"libc":         "/lib/x86_64-linux-gnu/libc.so.6",
		"ld.so":        "/lib64/ld-linux-x86-64.so.2",
	}
	return objs
}

// stackWords is a deterministic synthetic stack: every word is distinct and
// some point back into the stack, so saved-rbp chains and frame-pointer
// rules see plausible values.
type stackWords struct {
	base uint64
	data []byte
}

func newStack(base uint64, size int) *stackWords {
	s := &stackWords{base: base, data: make([]byte, size)}
	for off := 0; off+8 <= size; off += 8 {
		v := uint64(0x5555_0000_0000) + uint64(off)*0x9e37
		if off%24 == 0 {
			v = base + uint64((off*7)%size)&^7 // a pointer into the stack
		}
		binary.LittleEndian.PutUint64(s.data[off:], v)
	}
	return s
}

// from returns the copy of the stack from addr on (what a capture at sp=addr holds).
func (s *stackWords) from(addr uint64) []byte { return s.data[addr-s.base:] }

func (s *stackWords) read(addr uint64) (uint64, bool) {
	if addr < s.base || addr-s.base+8 > uint64(len(s.data)) || addr+8 < addr {
		return 0, false
	}
	return binary.LittleEndian.Uint64(s.data[addr-s.base:]), true
}

// TestCompileMatchesInterpreter evaluates, at every pc of every executable
// section of each fixture, the compact table and internal/unwind's
// interpreter on the same registers and stack, in several register states:
// their answers (next rip, rsp, rbp, rbp validity, end of stack, stop) must
// be identical wherever the compact rule is not CFAStop, and CFAStop rows
// must be only those with a counted reason.
func TestCompileMatchesInterpreter(t *testing.T) {
	const stackBase = 0x7ffd_0000_0000
	const bias = 0x7f00_0000_0000 // a page-aligned load bias: runtime IP = vaddr + bias
	stack := newStack(stackBase, 16<<10)
	sp := uint64(stackBase + 4096)
	states := []unwind.FrameState{
		{Regs: unwind.Regs{SP: sp, BP: sp + 0x100}, BPValid: true},
		{Regs: unwind.Regs{SP: sp, BP: sp + 0x40}, BPValid: false},
		{Regs: unwind.Regs{SP: sp, BP: sp - 64}, BPValid: true},               // rbp below rsp
		{Regs: unwind.Regs{SP: sp, BP: sp + 0x103}, BPValid: true},            // misaligned
		{Regs: unwind.Regs{SP: stackBase + 16<<10 - 8, BP: 0}, BPValid: true}, // at the end of the copy
	}
	for name, path := range fixtures(t) {
		t.Run(name, func(t *testing.T) {
			f, err := elf.Open(path)
			if err != nil {
				t.Fatalf("open %s: %v", path, err)
			}
			defer f.Close()
			src, err := unwind.ParseTable(f)
			if err != nil {
				t.Fatalf("parse CFI of %s: %v", path, err)
			}
			ct, err := Compile(src, 0)
			if err != nil {
				t.Fatalf("compile %s: %v", path, err)
			}
			var pcs, stops, ends, nexts, fps, signals int
			mismatch, lost := 0, 0
			for _, sec := range f.Sections {
				if sec.Flags&elf.SHF_EXECINSTR == 0 || sec.Type != elf.SHT_PROGBITS {
					continue
				}
				// The unit tier (-short) takes every 4th pc of the large
				// objects (still at least one of each 4-byte run, as the
				// 7-byte signal trampoline); the full run takes every pc.
				stride := uint64(1)
				if testing.Short() && (name == "libc" || name == "ld.so") {
					stride = 4
				}
				for va := sec.Addr; va < sec.Addr+sec.Size; va += stride {
					pcs++
					rule := ct.Lookup(va)
					switch rule.CFA {
					case CFAFP:
						fps++
					case CFASignal:
						signals++
					}
					sts := states
					if name == "libc" || name == "ld.so" {
						sts = states[:2] // every pc still; fewer states on the large objects (time)
					}
					for si, s := range sts {
						for _, exact := range []bool{true, false} {
							s.Exact = exact
							s.IP = va + bias
							if !exact {
								s.IP++ // a return address: rules of the call at IP-1
							}
							want, wres := src.Step(va, s, stack.from(s.SP))
							// The copy starts at rsp, as in a capture.
							copyAt := stackWords{base: s.SP, data: stack.from(s.SP)}
							got, gres := StepRule(rule, s, copyAt.read)
							if rule.CFA == CFAStop {
								stops++
								if wres != unwind.StepStop {
									lost++
								}
								continue
							}
							switch gres {
							case unwind.StepEnd:
								ends++
							case unwind.StepNext:
								nexts++
							}
							if gres != wres || (gres == unwind.StepNext && (got.Regs != want.Regs || got.BPValid != want.BPValid || got.Exact != want.Exact)) {
								if mismatch++; mismatch <= 10 {
									t.Errorf("%s vaddr %#x state %d exact=%v: compact rule %+v gives %v %+v, interpreter %v %+v",
										filepath.Base(path), va, si, exact, rule, gres, got, wres, want)
								}
							}
						}
					}
				}
			}
			t.Logf("%s: %d source rows -> %d compact rows (%d B); %d pcs: %d next, %d end, %d stop evaluations (%d where the interpreter continues); %d pcs by frame pointer; %d PLT rows; stop rows by reason %v",
				filepath.Base(path), ct.SourceRows, len(ct.Rows), ct.Bytes(), pcs, nexts, ends, stops, lost, fps, ct.PLTRows, ct.Unsupported)
			if mismatch > 0 {
				t.Errorf("%d evaluations differ from the interpreter", mismatch)
			}
			if pcs == 0 {
				t.Fatalf("no executable section in %s", path)
			}
			switch name {
			case "lib-no-cfi":
				if len(ct.Rows) != 0 || fps != pcs {
					t.Errorf("object without CFI: %d rows, %d of %d pcs by frame pointer; want 0 rows, all", len(ct.Rows), fps, pcs)
				}
			case "libc", "ld.so":
				// Only rules the interpreter cannot evaluate either (ld.so's
				// resolver uses rbx as CFA register) may be beyond the BPF
				// walk; libc's signal trampoline is evaluated.
				for why, n := range ct.Unsupported {
					if why != "rule internal/unwind cannot evaluate" {
						t.Errorf("%d stop rows for %q in %s; want only signal frames", n, why, name)
					}
				}
			default:
				if ct.StopRows != 0 {
					t.Errorf("%d stop rows (%v) in a compiler-built fixture", ct.StopRows, ct.Unsupported)
				}
				if nexts == 0 || fps == pcs {
					t.Errorf("fixture with CFI evaluated no CFI step (%d next, %d of %d pcs by frame pointer)", nexts, fps, pcs)
				}
			}
			if name == "libc" && signals == 0 {
				t.Errorf("no signal-trampoline row in libc")
			}
			if name == "chain-omitfp" && ct.PLTRows == 0 {
				t.Errorf("no PLT rows in an executable with a .plt")
			}
		})
	}
}
