package bench

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/cilium/ebpf"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/bpf/empty"
	"github.com/memprof/memprof/internal/attach"
	"github.com/memprof/memprof/internal/bpfload"
	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/internal/unwindtable"
)

var (
	budgetFlag = flag.Duration("budget", time.Second, "timed malloc+free loop per configuration")
	roundsFlag = flag.Int("rounds", 10, "timed rounds per configuration (the fastest is reported)")
	sizesFlag  = flag.String("sizes", "64,4096", "block sizes in bytes, comma-separated")
	pinFlag    = flag.Int("pin", -1, "CPU to pin the workload to (-1: no pinning)")
)

// probes says what is attached during a run.
type probes int

const (
	noProbes probes = iota
	emptyProbes
	emptySessionProbes
	memprofProbes
)

// config is one column of the table.
type config struct {
	name      string // sub-benchmark name
	column    string // summary column
	probes    probes
	entryOnly bool   // probes at offset 0 instead of memprof's sites
	rate      uint64 // memprof's sample rate
	dwarf     bool   // copy every sampled stack for userspace unwinding
	cfi       bool   // walk every sampled stack with CFI in BPF (the default stack mode)
	noSession bool   // entry and return links (kernels before 6.13) instead of session links
	retSites  bool   // every result taken at ret instructions instead of return probes
	second    bool   // a second target (idle, same libraries) attached by the same session
}

// defaultRate is memprof's default sample rate (recorder.DefaultSampleRate;
// not imported so the benchmark builds without the recorder's dependencies).
const defaultRate = 512 * 1024

var configs = []config{
	{name: "1-none", column: "none", probes: noProbes},
	{name: "2-empty-floor", column: "empty-floor", probes: emptyProbes},
	{name: "2b-empty-session", column: "empty-session", probes: emptySessionProbes},
	{name: "3-empty-entry", column: "empty-entry", probes: emptyProbes, entryOnly: true},
	{name: "4-memprof-default", column: "memprof-default", probes: memprofProbes, rate: defaultRate},
	{name: "4b-memprof-default-nosession", column: "default-no-session", probes: memprofProbes, rate: defaultRate, noSession: true},
	{name: "4c-memprof-default-2-targets", column: "default-2-targets", probes: memprofProbes, rate: defaultRate, second: true},
	{name: "5-memprof-rate1", column: "memprof-rate1", probes: memprofProbes, rate: 1},
	{name: "6-memprof-default-dwarf", column: "dwarf-default", probes: memprofProbes, rate: defaultRate, dwarf: true},
	{name: "7-memprof-rate1-dwarf", column: "dwarf-rate1", probes: memprofProbes, rate: 1, dwarf: true},
	{name: "8-memprof-default-retsites", column: "default-retsites", probes: memprofProbes, rate: defaultRate, retSites: true},
	{name: "9-memprof-default-cfi", column: "cfi-default", probes: memprofProbes, rate: defaultRate, cfi: true},
	{name: "9b-memprof-rate1-cfi", column: "cfi-rate1", probes: memprofProbes, rate: 1, cfi: true},
}

// allocators are the rows: the allocator (the attached object that must be
// found) and the workload (C malloc+free, or C++ operator new+delete).
var allocators = []struct {
	name, alloc, src string
	env              []string
}{
	{"glibc", "glibc", "bench_pairs.c", nil},
	{"jemalloc", "jemalloc", "bench_pairs.c", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
	{"glibc-new", "libstdc++", "bench_new.cc", nil},
	{"jemalloc-new", "jemalloc", "bench_new.cc", []string{"LD_PRELOAD=" + testprog.Jemalloc}},
}

// results holds every measurement for the summary, by allocator, size and
// configuration; sites the probe sites seen per allocator.
var results = struct {
	sync.Mutex
	ns       map[string][]float64 // key: alloc/size/config
	counters map[string]string    // key: alloc/size/config, memprof configs only
	rows     []string             // alloc/size in run order
	sites    map[string][]*attach.Object
	order    []string // allocators in run order
}{ns: map[string][]float64{}, counters: map[string]string{}, sites: map[string][]*attach.Object{}}

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	printSummary(os.Stdout)
	os.Exit(code)
}

func sizes(tb testing.TB) []int {
	var out []int
	for _, f := range strings.Split(*sizesFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			tb.Fatalf("bad -sizes %q: %q is not a positive byte count", *sizesFlag, f)
		}
		out = append(out, n)
	}
	return out
}

func sizeName(n int) string {
	if n >= 1024 && n%1024 == 0 {
		return fmt.Sprintf("%dKiB", n/1024)
	}
	return fmt.Sprintf("%dB", n)
}

// BenchmarkMallocFree runs every configuration for every allocator and size.
// Sub-benchmarks report ns/pair (ns/op is hidden: b.N is ignored).
func BenchmarkMallocFree(b *testing.B) {
	testprog.RequireRoot(b)
	if _, err := os.Stat(testprog.Jemalloc); err != nil {
		b.Fatalf("jemalloc not installed (%v): apt-get install libjemalloc2", err)
	}
	bins := map[string]string{}
	for _, al := range allocators {
		if bins[al.src] == "" {
			bins[al.src] = testprog.Build(b, al.src, "-O2")
		}
	}
	for _, al := range allocators {
		bin := bins[al.src]
		b.Run(al.name, func(b *testing.B) {
			for _, size := range sizes(b) {
				b.Run(sizeName(size), func(b *testing.B) {
					row := al.name + "/" + sizeName(size)
					results.Lock()
					if !contains(results.rows, row) {
						results.rows = append(results.rows, row)
					}
					results.Unlock()
					for _, c := range configs {
						b.Run(c.name, func(b *testing.B) {
							ns := runConfig(b, bin, al.name, al.alloc, al.env, size, c)
							b.ReportMetric(0, "ns/op")
							b.ReportMetric(ns, "ns/pair")
							results.Lock()
							key := row + "/" + c.column
							results.ns[key] = append(results.ns[key], ns)
							if c.column == "memprof-default" {
								if floor := median(results.ns[row+"/empty-floor"]); floor > 0 {
									b.ReportMetric(ns/floor, "x-floor")
								}
							}
							results.Unlock()
						})
					}
				})
			}
		})
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// runResult is the program's RESULT line.
type runResult struct {
	median, min, max float64
	pairs, total     uint64
}

// runConfig starts the program, attaches the configuration's probes while it
// waits, lets it run and returns its median ns per pair. Everything it
// loads or attaches is closed before it returns.
func runConfig(b *testing.B, bin, row, alloc string, env []string, size int, c config) float64 {
	what := fmt.Sprintf("%s, %d-byte blocks, %s", row, size, c.name)
	var objs *bpfload.Objects
	if c.probes != noProbes {
		rate := c.rate
		if rate == 0 {
			rate = defaultRate
		}
		mode := mbpf.MemprofStackModeSM_FP
		if c.dwarf {
			mode = mbpf.MemprofStackModeSM_DWARF
		}
		if c.cfi {
			mode = mbpf.MemprofStackModeSM_CFI
		}
		var err error
		objs, err = bpfload.Load(bpfload.Options{SampleRate: rate, StackMode: mode, NoSession: c.noSession})
		if err != nil {
			b.Fatalf("%s: load BPF programs: %v", what, err)
		}
		defer objs.Close()
		if c.dwarf {
			// Drain the stack copies as memprof's reader would (the
			// unwinding itself runs in memprof, not in the target: its
			// cost is BenchmarkUnwind in internal/unwind).
			rd, err := ringbuf.NewReader(objs.Events)
			if err != nil {
				b.Fatalf("%s: open ring buffer: %v", what, err)
			}
			defer rd.Close()
			go func() {
				var rec ringbuf.Record
				for rd.ReadInto(&rec) == nil {
				}
			}()
		}
	}

	prog := start(b, what, bin, env, strconv.Itoa(size), strconv.FormatInt(budgetFlag.Milliseconds(), 10), strconv.Itoa(*roundsFlag))
	defer prog.stop()
	if *pinFlag >= 0 {
		var set unix.CPUSet
		set.Set(*pinFlag)
		if err := unix.SchedSetaffinity(prog.cmd.Process.Pid, &set); err != nil {
			b.Fatalf("%s: pin the program to CPU %d: %v", what, *pinFlag, err)
		}
	}
	prog.expect(b, "READY")

	if objs != nil {
		progs := objs.Programs()
		switch c.probes {
		case emptyProbes, emptySessionProbes:
			e, err := loadEmpty(objs.Features, c.probes == emptySessionProbes)
			if err != nil {
				b.Fatalf("%s: load the empty programs: %v", what, err)
			}
			defer e.Close()
			progs = e.programs
		}
		att := attach.New(progs)
		att.EntryOnly = c.entryOnly
		att.AllRetSites = c.retSites
		defer func() {
			t0 := time.Now()
			att.Close()
			b.Logf("%s: detach took %v", what, time.Since(t0))
			if n := att.Links(); n != 0 {
				b.Errorf("%s: %d probes still attached after Close", what, n)
			}
		}()
		if c.second {
			// An idle process of the same program: its links are at the
			// same addresses as the measured one's.
			idle := start(b, what+" (idle second target)", bin, env, strconv.Itoa(size), "1", "1")
			defer idle.stop()
			idle.expect(b, "READY")
			if _, err := att.Process(idle.cmd.Process.Pid); err != nil {
				b.Fatalf("%s: attach the second target: %v", what, err)
			}
		}
		t0 := time.Now()
		attached, err := att.Process(prog.cmd.Process.Pid)
		if err != nil {
			b.Fatalf("%s: attach probes to pid %d: %v", what, prog.cmd.Process.Pid, err)
		}
		b.Logf("%s: attach took %v (%d probes)", what, time.Since(t0), att.Links())
		if c.cfi {
			// The unwind tables of the program's objects, built before
			// it proceeds (as memprof does before a pid target's probes
			// fire).
			pid := prog.cmd.Process.Pid
			maps, err := procmaps.Read(pid)
			if err != nil {
				b.Fatalf("%s: %v", what, err)
			}
			t0 := time.Now()
			if err := objs.Unwind.SetProcess(pid, maps); err != nil {
				b.Fatalf("%s: unwind tables: %v", what, err)
			}
			if !objs.Unwind.WaitFor(30 * time.Second) {
				b.Fatalf("%s: unwind tables not built within 30s", what)
			}
			st := objs.Unwind.Stats()
			b.Logf("%s: unwind tables built in %v: %d objects, %d rows, %d bytes", what, time.Since(t0), st.Objects, st.Rows, st.Bytes)
		}
		found := false
		for _, o := range attached {
			found = found || o.Allocator == alloc
		}
		if !found {
			b.Fatalf("%s: no %s object among the attached ones (%s)", what, alloc, objectNames(attached))
		}
		if c.probes == emptyProbes && !c.entryOnly {
			results.Lock()
			if _, ok := results.sites[row]; !ok {
				results.sites[row] = attached
				results.order = append(results.order, row)
			}
			results.Unlock()
		}
	}

	prog.proceed(b)
	line := prog.expect(b, "RESULT")
	r, err := parseResult(line)
	if err != nil {
		b.Fatalf("%s: %v", what, err)
	}
	if err := prog.wait(); err != nil {
		b.Fatalf("%s: %v", what, err)
	}
	b.Logf("%s: %.1f ns/pair (fastest of %d rounds; median %.1f, slowest %.1f; %d timed pairs)", what, r.min, *roundsFlag, r.median, r.max, r.pairs)

	if c.probes == memprofProbes {
		ctr, err := objs.ReadCounters()
		if err != nil {
			b.Fatalf("%s: %v", what, err)
		}
		// Every pair made after the probes went in must have been seen:
		// this is what proves the probes fired.
		if ctr.Calls < r.total || ctr.Frees < r.total {
			b.Errorf("%s: BPF saw %d allocating calls and %d frees, fewer than the %d pairs made with the probes in place", what, ctr.Calls, ctr.Frees, r.total)
		}
		if c.dwarf && ctr.StackCopies == 0 {
			b.Errorf("%s: no stack copied in dwarf mode", what)
		}
		if c.cfi {
			w, err := unwindtable.ReadWalkStats(objs.UwStats)
			if err != nil {
				b.Fatalf("%s: %v", what, err)
			}
			if w.Complete == 0 || w.Truncated() != 0 || ctr.StackCopies != 0 {
				b.Errorf("%s: BPF walks: %d complete, %d truncated (%+v), %d stack copies; want all complete, none copied", what, w.Complete, w.Truncated(), w, ctr.StackCopies)
			}
		}
		if c.rate == 1 && ctr.Samples < r.total {
			b.Errorf("%s: rate 1 sampled %d allocations, fewer than the %d made", what, ctr.Samples, r.total)
		}
		s := fmt.Sprintf("calls %d, frees %d, samples %d, stack copies %d, nested %d, lost %v", ctr.Calls, ctr.Frees, ctr.Samples, ctr.StackCopies, ctr.Nested, ctr.Lost())
		b.Logf("%s: BPF counters: %s", what, s)
		results.Lock()
		results.counters[fmt.Sprintf("%s/%s/%s", row, sizeName(size), c.column)] = s
		results.Unlock()
	}
	return r.min
}

// emptyObjects are the empty programs (package bpf/empty) and their
// attach.Programs.
type emptyObjects struct {
	empty.EmptyObjects
	programs attach.Programs
}

// loadEmpty loads the empty programs: entry and return probes on every call,
// as plain uretprobes pay, or (session) an empty session program that never
// asks for the return, the floor of session uprobes (one trap per call).
// Probes on ret instructions and tail jumps get the empty entry program.
func loadEmpty(f bpfload.Features, session bool) (*emptyObjects, error) {
	spec, err := empty.LoadEmpty()
	if err != nil {
		return nil, err
	}
	names := []string{"empty_enter_multi", "empty_return_multi", "empty_session"}
	for _, n := range names {
		if (n == "empty_session" && !f.UprobeSession) || !f.UprobeMulti {
			p := spec.Programs["empty_enter"].Copy()
			p.Name = n
			spec.Programs[n] = p
		}
	}
	e := &emptyObjects{}
	if err := spec.LoadAndAssign(&e.EmptyObjects, nil); err != nil {
		return nil, err
	}
	p := attach.Programs{Enter: map[attach.Kind]*ebpf.Program{}, Return: e.EmptyReturn,
		RetSite: e.EmptyEnter, TailSite: e.EmptyEnter}
	if f.UprobeMulti {
		p.Multi, p.MultiReturn = e.EmptyEnterMulti, e.EmptyReturnMulti
	}
	for k := attach.Malloc; k <= attach.Free; k++ {
		p.Enter[k] = e.EmptyEnter
	}
	if session && f.UprobeSession {
		p.Session = e.EmptySession
	}
	e.programs = p
	return e, nil
}

func objectNames(objs []*attach.Object) string {
	var s []string
	for _, o := range objs {
		s = append(s, o.Path+" ("+o.Allocator+")")
	}
	return strings.Join(s, ", ")
}

// formatSites lists each object's probed functions with offset and whether
// the kernel emulates the probed instruction.
func formatSites(objs []*attach.Object) string {
	var buf strings.Builder
	for _, o := range objs {
		entries, emulated := o.Probed()
		fmt.Fprintf(&buf, "  %s [%s]: %d probed functions, %d at emulated instructions\n", o.Path, o.Allocator, entries, emulated)
		var parts []string
		for _, s := range o.Sites {
			switch {
			case s.Thunk:
				parts = append(parts, s.Symbol+" (thunk, not probed)")
			case s.Emulated:
				parts = append(parts, fmt.Sprintf("%s+%#x (%s, emulated%s)", s.Symbol, s.Offset, s.Insn, retNote(o, s)))
			default:
				parts = append(parts, fmt.Sprintf("%s+%#x (%s, SINGLE-STEPPED%s)", s.Symbol, s.Offset, s.Insn, retNote(o, s)))
			}
		}
		for i := 0; i < len(parts); i += 3 {
			fmt.Fprintf(&buf, "    %s\n", strings.Join(parts[i:min(i+3, len(parts))], "; "))
		}
	}
	return buf.String()
}

// retNote says where a function's result is taken when not by a return
// probe.
func retNote(o *attach.Object, s attach.Site) string {
	if s.Forwards && o.Forwarding() {
		return "; entry only, block recorded at the return of the malloc it calls"
	}
	if !s.RetSites {
		return ""
	}
	return fmt.Sprintf("; result at %d ret instructions, single-stepped", len(s.Rets))
}

func parseResult(line string) (runResult, error) {
	var r runResult
	fields := map[string]string{}
	for _, f := range strings.Fields(line)[1:] {
		k, v, ok := strings.Cut(f, "=")
		if ok {
			fields[k] = v
		}
	}
	var err error
	num := func(k string) float64 {
		v, e := strconv.ParseFloat(fields[k], 64)
		if e != nil && err == nil {
			err = fmt.Errorf("bad %s in program output %q", k, line)
		}
		return v
	}
	r.median, r.min, r.max = num("median_ns"), num("min_ns"), num("max_ns")
	r.pairs, r.total = uint64(num("pairs")), uint64(num("total_pairs"))
	return r, err
}

// program is a running bench_pairs.
type program struct {
	what   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr bytes.Buffer
	limit  time.Duration
	done   bool
}

func start(b *testing.B, what, bin string, env []string, args ...string) *program {
	p := &program{what: what, cmd: exec.Command(bin, args...), lines: make(chan string, 16)}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = &p.stderr
	p.limit = 3*(*budgetFlag) + 60*time.Second
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		b.Fatal(err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		b.Fatalf("%s: start %s: %v", what, bin, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	return p
}

// expect waits for a line starting with prefix and returns it.
func (p *program) expect(b *testing.B, prefix string) string {
	timeout := time.After(p.limit)
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				err := p.wait()
				b.Fatalf("%s: program ended before printing %s: %v", p.what, prefix, err)
			}
			if strings.HasPrefix(line, prefix) {
				return line
			}
		case <-timeout:
			b.Fatalf("%s: no %s line from the program after %v", p.what, prefix, p.limit)
		}
	}
}

func (p *program) proceed(b *testing.B) {
	if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
		b.Fatalf("%s: tell the program to start: %v", p.what, err)
	}
}

func (p *program) wait() error {
	if p.done {
		return nil
	}
	p.done = true
	p.stdin.Close()
	for range p.lines {
	}
	if err := p.cmd.Wait(); err != nil {
		return fmt.Errorf("program %v: %w; stderr: %s", p.cmd.Args, err, strings.TrimSpace(p.stderr.String()))
	}
	return nil
}

// stop kills the program if it is still running (after a failure).
func (p *program) stop() {
	if p.done {
		return
	}
	p.cmd.Process.Kill()
	p.wait()
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// printSummary writes the table: rows allocator x size, columns the
// configurations and the ratios memprof-default / empty-floor (the target is
// at most 1.3) and empty-entry / empty-floor (what the site choice saves).
func printSummary(w io.Writer) {
	results.Lock()
	defer results.Unlock()
	if len(results.rows) == 0 {
		return
	}
	fmt.Fprintf(w, "\nmemprof bench: ns per malloc+free pair, one thread, fastest of %d rounds of %v each", *roundsFlag, *budgetFlag/time.Duration(*roundsFlag))
	if n := len(results.ns[results.rows[0]+"/none"]); n > 1 {
		fmt.Fprintf(w, ", median of %d runs", n)
	}
	fmt.Fprintf(w, "\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "allocator\tsize\t")
	for _, c := range configs {
		fmt.Fprintf(tw, "%s\t", c.column)
	}
	fmt.Fprint(tw, "default/floor\tno-session/floor\t2-targets/floor\tdwarf-default/floor\tcfi-default/floor\tretsites/floor\tentry/floor\tdwarf cost/sample\tcfi cost/sample\tcfi/fp per sample\t\n")
	for _, row := range results.rows {
		alloc, size, _ := strings.Cut(row, "/")
		fmt.Fprintf(tw, "%s\t%s\t", alloc, size)
		for _, c := range configs {
			if v := median(results.ns[row+"/"+c.column]); v > 0 {
				fmt.Fprintf(tw, "%.1f\t", v)
			} else {
				fmt.Fprint(tw, "-\t")
			}
		}
		floor := median(results.ns[row+"/empty-floor"])
		for _, col := range []string{"memprof-default", "default-no-session", "default-2-targets", "dwarf-default", "cfi-default", "default-retsites", "empty-entry"} {
			if v := median(results.ns[row+"/"+col]); v > 0 && floor > 0 {
				fmt.Fprintf(tw, "%.2f\t", v/floor)
			} else {
				fmt.Fprint(tw, "-\t")
			}
		}
		// At rate 1 every pair has one sampled allocation: the difference
		// is what a stack copy costs the target per sample over the
		// frame-pointer walk.
		fp := median(results.ns[row+"/memprof-rate1"])
		for _, col := range []string{"dwarf-rate1", "cfi-rate1"} {
			if d := median(results.ns[row+"/"+col]); d > 0 && fp > 0 {
				fmt.Fprintf(tw, "%+.0f ns\t", d-fp)
			} else {
				fmt.Fprint(tw, "-\t")
			}
		}
		// Per sampled allocation over the floor (probes that do nothing):
		// the CFI walk's whole sample against the frame-pointer walk's.
		if cfi := median(results.ns[row+"/cfi-rate1"]); cfi > 0 && fp > floor && floor > 0 {
			fmt.Fprintf(tw, "%.2f\t", (cfi-floor)/(fp-floor))
		} else {
			fmt.Fprint(tw, "-\t")
		}
		fmt.Fprint(tw, "\n")
	}
	tw.Flush()
	fmt.Fprintln(w, "empty-floor: empty entry and return probes at memprof's sites; empty-session: empty session probes (entry trap only)")
	fmt.Fprintln(w, "default/floor: memprof at the default 512 KiB rate (session links: return probes only for sampled calls) over the empty entry+return floor (target <= 1.3)")
	fmt.Fprintln(w, "no-session/floor: the same with entry and return links on every call, as on kernels before 6.13")
	fmt.Fprintln(w, "2-targets/floor: the same with a second, idle target of the same program attached by the session (the kernel runs every consumer of a probed address: the other target's session link asks for a return on every call)")
	fmt.Fprintln(w, "dwarf-default/floor: the same with every sampled stack copied for CFI unwinding (--stack-mode dwarf)")
	fmt.Fprintln(w, "retsites/floor: the same with every result taken by probes on ret instructions instead of return probes (memprof does so only for operator new, which may throw)")
	fmt.Fprintln(w, "entry/floor: empty probes at each function's first instruction over empty probes at memprof's sites")
	fmt.Fprintln(w, "cfi-default/floor: the same with every sampled stack walked with CFI in BPF (--stack-mode cfi, the default)")
	fmt.Fprintln(w, "dwarf cost/sample: copying registers and 8 KiB of stack instead of the frame-pointer walk, per sampled allocation (rate-1 columns)")
	fmt.Fprintln(w, "cfi cost/sample: the CFI walk in BPF (and interning its stack) instead of the frame-pointer walk, per sampled allocation (rate-1 columns)")
	fmt.Fprintln(w, "cfi/fp per sample: (cfi-rate1 - empty-floor) / (memprof-rate1 - empty-floor): a sampled pair's whole BPF cost with the CFI walk over that with the frame-pointer walk (target <= 1.5)")
	// The sites the workload goes through (the full lists are in the
	// 2-empty-floor logs).
	for _, alloc := range results.order {
		var parts []string
		for _, o := range results.sites[alloc] {
			if o.Allocator != strings.TrimSuffix(alloc, "-new") && o.Allocator != "libstdc++" {
				continue
			}
			for _, s := range o.Sites {
				if s.Symbol != "malloc" && s.Symbol != "free" && s.Symbol != "_Znwm" {
					continue
				}
				em := "emulated"
				if !s.Emulated {
					em = "single-stepped"
				}
				parts = append(parts, fmt.Sprintf("%s+%#x (%s, %s)", s.Symbol, s.Offset, strings.ToLower(s.Insn), em))
			}
		}
		fmt.Fprintf(w, "%s sites: %s\n", alloc, strings.Join(parts, ", "))
	}
	for _, alloc := range results.order {
		fmt.Fprintf(w, "all probe sites in the %s process:\n%s", alloc, formatSites(results.sites[alloc]))
	}
}
