package unwindtable

import (
	"debug/elf"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwind"
)

// benchReps is UW_BENCH_REPS of bpf/unwindtest.bpf.c: walks per run.
const benchReps = 16

// BenchmarkBPFWalk measures, inside BPF (bpf_ktime_get_ns around 16 walks
// per BPF_PROG_RUN), the cost of one CFI walk of a captured unw_chain stack
// (-O2 -fomit-frame-pointer, 21 frames through exe, lib and libc) against
// bpf_get_stack's frame-pointer walk of the calling Go thread's own stack
// (what --stack-mode fp costs per sample). Both read user memory with the
// kernel's nofault copy; ns/frame compares them at equal depth.
func BenchmarkBPFWalk(b *testing.B) {
	testprog.RequireRoot(b)
	o := loadBPF(b, testRows)
	st := NewStore(testMaps(o), 0, 2)
	for _, c := range []struct {
		name     string
		exe, lib []string
	}{{"omit-fp", omitFP, omitFP}, {"keep-fp", keepFP, keepFP}} {
		p := buildPair(b, c.name, c.exe, c.lib)
		tg := startTarget(b, p.exe, "chain")
		regs, stack := capture(b, tg.pid, tg.tid, 32<<10)
		if err := st.SetProcess(tg.pid, tg.maps); err != nil {
			b.Fatal(err)
		}
		st.Wait()
		b.Run("cfi/"+c.name, func(b *testing.B) {
			newSnapshot(b, o, regs.SP, stack)
			if err := o.TestIn.Put(uint32(0), bpf.UnwindtestUwTestIn{Pid: uint32(tg.pid), Ip: regs.IP, Sp: regs.SP, Bp: regs.BP}); err != nil {
				b.Fatal(err)
			}
			runBench(b, o, o.UwBench)
		})
	}
	// The Go stack calling BPF_PROG_RUN, made 21 frames deep like the
	// captured one (Go keeps frame pointers).
	b.Run("bpf_get_stack-fp", func(b *testing.B) { atDepth(10, func() { runBench(b, o, o.FpBench) }) })
}

// atDepth calls f n frames deeper.
//
//go:noinline
func atDepth(n int, f func()) {
	if n == 0 {
		f()
		return
	}
	atDepth(n-1, f)
}

func runBench(b *testing.B, o *bpf.UnwindtestObjects, prog *ebpf.Program) {
	var ns, frames uint64
	runs := 0
	for b.Loop() {
		if _, err := prog.Run(&ebpf.RunOptions{}); err != nil {
			b.Fatalf("BPF_PROG_RUN: %v", err)
		}
		var out bpf.UnwindtestUwTestOut
		if err := o.TestOut.Lookup(uint32(0), &out); err != nil {
			b.Fatal(err)
		}
		if out.Status != 0 || out.Err < 0 {
			b.Fatalf("walk status %d err %d", out.Status, out.Err)
		}
		ns += out.Ns
		frames = uint64(out.N)
		runs++
	}
	walks := float64(runs * benchReps)
	b.ReportMetric(float64(ns)/walks, "ns/stack")
	b.ReportMetric(float64(frames), "frames")
	if frames > 0 {
		b.ReportMetric(float64(ns)/walks/float64(frames), "ns/frame")
	}
}

// BenchmarkTableBuild builds the compact tables of real objects (parse CFI
// and compile): the time a table takes to become ready, and its memory in
// the BPF row array, for libc, redis-server and a large C++ object (LLVM).
func BenchmarkTableBuild(b *testing.B) {
	for _, c := range []struct{ name, path string }{
		{"libc", "/lib/x86_64-linux-gnu/libc.so.6"},
		{"libstdc++", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"},
		{"redis-server", "/usr/bin/redis-server"},
		{"libLLVM-14", "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"},
	} {
		b.Run(c.name, func(b *testing.B) {
			f, err := elf.Open(c.path)
			if err != nil {
				b.Skipf("%s: %v", c.path, err)
			}
			defer f.Close()
			var t *Table
			for b.Loop() {
				src, err := unwind.ParseTable(f)
				if err != nil {
					b.Fatalf("parse %s: %v", c.path, err)
				}
				if t, err = Compile(src, 0); err != nil {
					b.Fatalf("compile %s: %v", c.path, err)
				}
			}
			rules := map[Rule]bool{}
			for _, r := range t.Rows {
				rules[r.Rule] = true
			}
			b.ReportMetric(float64(t.SourceRows), "cfi-rows")
			b.ReportMetric(float64(len(t.Rows)), "rows")
			b.ReportMetric(float64(len(rules)), "rules")
			b.ReportMetric(float64(t.Bytes()+int64(len(rules))*12), "table-bytes")
			b.ReportMetric(float64(t.StopRows), "stop-rows")
		})
	}
}
