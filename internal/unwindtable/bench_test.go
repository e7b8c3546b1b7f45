package unwindtable

import (
	"debug/elf"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/procmaps"
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

// BenchmarkLiveProbe times the walks where production runs them: in a
// uprobe on glibc's malloc in testdata/bench_pairs.c (built -O2 with frame
// pointers, so both walks are right), reading the live stack with
// bpf_probe_read_user and interning the stack (uw_walk + uw_intern,
// uw_probe), or bpf_get_stackid's frame-pointer walk into a stack map
// (fp_probe, what memprof's frame-pointer mode does), timed in BPF per probe
// hit over about a second of malloc+free pairs each. Run once
// (-benchtime=1x).
func BenchmarkLiveProbe(b *testing.B) {
	testprog.RequireRoot(b)
	spec, err := bpf.LoadUnwindprobe()
	if err != nil {
		b.Fatal(err)
	}
	spec.Maps["uw_rows"].MaxEntries = testRows
	var o bpf.UnwindprobeObjects
	if err := spec.LoadAndAssign(&o, nil); err != nil {
		b.Fatalf("load unwindprobe: %v", err)
	}
	defer o.Close()
	st := NewStore(Maps{Procs: o.UwProcs, Objects: o.UwObjects, Rows: o.UwRows, Rules: o.UwRules, Stale: o.UwStale}, 0, 1)
	bin := testprog.Build(b, "bench_pairs.c", "-O2", "-fno-omit-frame-pointer")
	for _, c := range []struct {
		name string
		prog *ebpf.Program
	}{{"cfi", o.UwProbe}, {"bpf_get_stackid-fp", o.FpProbe}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				p := testprog.Start(b, bin, nil, "64", "1000", "3")
				p.Expect(b, "READY")
				maps, err := procmaps.Read(p.Pid())
				if err != nil {
					b.Fatal(err)
				}
				if err := st.SetProcess(p.Pid(), maps); err != nil {
					b.Fatal(err)
				}
				st.Wait()
				libc := ""
				for _, m := range maps {
					if m.Exec() && strings.Contains(m.Path, "libc.so") {
						libc = m.Path
					}
				}
				ex, err := link.OpenExecutable(libc)
				if err != nil {
					b.Fatal(err)
				}
				l, err := ex.Uprobe("malloc", c.prog, &link.UprobeOptions{PID: p.Pid()})
				if err != nil {
					b.Fatal(err)
				}
				if err := o.ProbeOut.Put(uint32(0), bpf.UnwindprobeUwProbeOut{}); err != nil {
					b.Fatal(err)
				}
				p.Send(b, "go")
				p.Until(b, "RESULT", 2*time.Minute)
				l.Close()
				var out bpf.UnwindprobeUwProbeOut
				if err := o.ProbeOut.Lookup(uint32(0), &out); err != nil {
					b.Fatal(err)
				}
				if out.Calls == 0 {
					b.Fatal("the probe never ran")
				}
				if c.name == "cfi" && out.Status != uint32(bpf.UnwindtestUwStatusUW_COMPLETE) {
					b.Errorf("last walk status %d, want complete", out.Status)
				}
				b.ReportMetric(float64(out.NsTotal)/float64(out.Calls), "ns/stack")
				if c.name == "cfi" {
					b.ReportMetric(float64(out.Frames)/float64(out.Calls), "frames")
				} else if int64(out.StackId) < 0 {
					b.Errorf("bpf_get_stackid: %d", int64(out.StackId))
				} else {
					var pcs [MaxFrames]uint64
					if err := o.FpStacks.Lookup(uint32(out.StackId), &pcs); err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(float64(slices.Index(pcs[:], 0)), "frames")
				}
				b.ReportMetric(float64(out.Calls), "samples")
				st.RemoveProcess(p.Pid())
			}
		})
	}
}
