package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/memprof/memprof/internal/podfind"
	"github.com/memprof/memprof/internal/recorder"
	"github.com/memprof/memprof/pprofout"
)

func recordCommand() *cli.Command {
	return &cli.Command{
		Name:      "record",
		Usage:     "record a heap profile (or an RSS profile with --rss) of processes, a cgroup, a pod, or a command",
		ArgsUsage: "[-- command [args...]]",
		Description: "Examples:\n" +
			"  memprof record --pid 1234 --duration 30s -o heap.pb.gz\n" +
			"  memprof record --cgroup /sys/fs/cgroup/memory/mygroup\n" +
			"  memprof record --pod web-0 --namespace shop\n" +
			"  memprof record -o heap.pb.gz -- ./server --port 8080\n" +
			"Without --duration it records until the targets exit or Ctrl-C; the profile is written either way.",
		Flags: append([]cli.Flag{
			&cli.IntSliceFlag{Name: "pid", Aliases: []string{"p"}, Usage: "process to profile (repeatable)"},
			&cli.StringSliceFlag{Name: "cgroup", Usage: "cgroup directory: every process in it, including later ones (repeatable)"},
			&cli.StringFlag{Name: "pod", Usage: "Kubernetes pod on this node to profile"},
			&cli.StringFlag{Name: "namespace", Aliases: []string{"n"}, Usage: "namespace of --pod (default: any, if unambiguous)"},
			&cli.StringFlag{Name: "container", Aliases: []string{"c"}, Usage: "container of --pod (default: all)"},
			&cli.DurationFlag{Name: "duration", Aliases: []string{"d"}, Usage: "how long to record (default: until the targets exit or Ctrl-C)"},
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "profile file (default memprof-<target>-<time>.pb.gz)"},
			&cli.Uint64Flag{Name: "sample-rate", Value: recorder.DefaultSampleRate, Usage: "mean bytes between samples (Poisson); 1 records every allocation exactly"},
			&cli.StringFlag{Name: "stack-mode", Value: recorder.StackCFI, Usage: "cfi: .eh_frame/.debug_frame walk in BPF for every stack (frame pointers where an object has no CFI); fp: frame pointers only (cheapest); dwarf: stack copies unwound in userspace; auto: dwarf for processes whose own code lacks frame pointers, fp otherwise"},
			&cli.StringFlag{Name: "oom-dir", Usage: "where OOM post-mortems go (default: next to the profile)"},
			&cli.BoolFlag{Name: "all-ooms", Usage: "also report OOM kills of processes that are not targets"},
			&cli.IntFlag{Name: "top", Value: 10, Usage: "stacks shown in the summary"},
			&cli.StringFlag{Name: "fail-on-growth", Usage: "leak gate: exit with status 3, naming the stacks, when a stack classified growing (medium or high confidence) rises faster than this rate (e.g. 1MiB/min)"},
			&cli.BoolFlag{Name: "follow-children", Usage: "with --pid: also profile the targets' child processes, found while they run (a command after -- has its whole process tree followed from each fork)"},
			&cli.BoolFlag{Name: "rss", Usage: "record an RSS profile instead (which stacks faulted in the resident anonymous memory; page-fault tracepoints, no uprobes)"},
			&cli.BoolFlag{Name: "heap", Usage: "with --rss: record the heap profile too (-o), the RSS profile beside it (.rss.pb.gz), and compare them per process"},
		}, podPathFlags()...),
		Action: runRecord,
	}
}

func runRecord(c *cli.Context) error {
	if c.Bool("rss") {
		return runRecordRSS(c)
	}
	opts := recorder.Options{
		SampleRate: c.Uint64("sample-rate"),
		Pids:       c.IntSlice("pid"),
		Cgroups:    c.StringSlice("cgroup"),
		Command:    c.Args().Slice(),
		AllOOMs:    c.Bool("all-ooms"),
		StackMode:  c.String("stack-mode"),

		FollowChildren: c.Bool("follow-children"),
	}
	if err := checkRecordFlags(c); err != nil {
		return err
	}
	target := describeTarget(opts)
	cgs, podLabels, podTarget, err := podTargets(c)
	if err != nil {
		return err
	}
	opts.Cgroups = append(opts.Cgroups, cgs...)
	if podTarget != "" {
		target = podTarget
	}
	out := c.String("output")
	if out == "" {
		out = fmt.Sprintf("memprof-%s-%s.pb.gz", target, time.Now().Format("20060102-150405"))
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	oomDir := c.String("oom-dir")
	if oomDir == "" {
		oomDir = filepath.Dir(out)
	}
	// Messages and the summary carry names the targets chose (comms, paths,
	// function names): escaped. The status line's own controls are not.
	stderr := pprofout.PrintableWriter(os.Stderr)
	tty := term.IsTerminal(int(os.Stderr.Fd()))
	clearLine := func() {
		if tty {
			fmt.Fprint(os.Stderr, "\r\033[K")
		}
	}
	opts.Notify = func(msg string) {
		clearLine()
		fmt.Fprintln(stderr, "memprof:", msg)
	}
	opts.OOM = func(k *recorder.OOMKill) {
		paths, err := recorder.WriteOOM(k, oomDir)
		clearLine()
		if err != nil {
			fmt.Fprintf(stderr, "memprof: OOM kill of pid %d (%s): writing the post-mortem failed: %v\n", k.Victim.Pid, pprofout.Printable(k.Victim.Comm), err)
			return
		}
		fmt.Fprintf(stderr, "memprof: OOM KILL of pid %d (%s): post-mortem written: %s\n", k.Victim.Pid, pprofout.Printable(k.Victim.Comm), strings.Join(paths, ", "))
	}

	gate, err := parseGrowthLimit(c.String("fail-on-growth"))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	s, err := recorder.Start(ctx, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	seriesRec := s.RecordSeries()
	fmt.Fprintf(stderr, "memprof: recording %s (sample rate %d bytes); %s\n", target, opts.SampleRate, s.Features())
	for _, o := range s.Objects() {
		fmt.Fprintf(stderr, "memprof: probing %s (%s): %s\n", o.Path, o.Allocator, o.Plan())
	}

	progressDone := make(chan struct{})
	if tty {
		go progress(s, os.Stderr, progressDone)
	}
	reason := s.Wait(ctx, c.Duration("duration"))
	close(progressDone)
	clearLine()
	fmt.Fprintf(stderr, "memprof: stopped: %s after %s\n", reason, time.Since(s.StartTime()).Round(time.Millisecond))
	written, err := writeResult(s, out, podLabels, c.Int("top"), stderr)
	if err != nil {
		return err
	}
	// Next to the profile as written (the $TMPDIR fallback if -o failed).
	return writeSeries(seriesRec, written, gate, stderr)
}

func describeTarget(o recorder.Options) string {
	switch {
	case len(o.Command) > 0:
		return filepath.Base(o.Command[0])
	case len(o.Pids) > 0:
		var parts []string
		for _, p := range o.Pids {
			parts = append(parts, strconv.Itoa(p))
		}
		return "pid" + strings.Join(parts, "-")
	case len(o.Cgroups) > 0:
		return "cgroup-" + filepath.Base(o.Cgroups[0])
	}
	return "none"
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

// progress redraws one status line on stderr each second.
func progress(s *recorder.Session, w io.Writer, done <-chan struct{}) {
	start := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		c, err := s.Counters()
		if err != nil {
			continue
		}
		live := int64(0)
		if p, err := s.Profile(); err == nil {
			if built, err := pprofout.Build(p); err == nil {
				for _, v := range recorder.LiveByPid(built) {
					live += v
				}
			}
		}
		fmt.Fprintf(w, "\r\033[K[%s] allocations seen: %d  frees: %d  samples: %d  estimated live: %s  targets: %d",
			time.Since(start).Round(time.Second), c.Calls, c.Frees, c.Samples, pprofout.HumanBytes(live), len(s.Targets()))
	}
}

// writeResult builds and writes the profile, then prints the summary. It
// returns the path written (out, or the fallback in $TMPDIR).
func writeResult(s *recorder.Session, out string, extraLabels map[string]string, top int, w io.Writer) (string, error) {
	p, err := s.Profile()
	if err != nil {
		return "", fmt.Errorf("read recorded state: %w", err)
	}
	for i := range p.Samples {
		for k, v := range extraLabels {
			p.Samples[i].Labels[k] = v
		}
	}
	built, err := pprofout.Build(p)
	if err != nil {
		return "", fmt.Errorf("build profile: %w", err)
	}
	frags := s.Fragmentation(built)
	p.Comments = append(p.Comments, recorder.FragComments(frags)...)
	written, err := writeProfile(out, p, w)
	if err != nil {
		return "", err
	}
	out = written
	c, _ := s.Counters()
	fmt.Fprintf(w, "\nmemprof: %d allocator calls and %d frees seen, %d sampled\n", c.Calls, c.Frees, c.Samples)
	if lost := c.Lost(); len(lost) > 0 {
		keys := make([]string, 0, len(lost))
		for k := range lost {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var parts []string
		for _, k := range keys {
			parts = append(parts, fmt.Sprintf("%s=%d", k, lost[k]))
		}
		fmt.Fprintf(w, "memprof: LOST events (also in the profile's comments): %s\n", strings.Join(parts, " "))
	} else {
		fmt.Fprintln(w, "memprof: no events lost")
	}
	if n := s.Exited(); n > 0 {
		fmt.Fprintf(w, "memprof: %d targets exited during the recording; their heaps as they were then are in the profile\n", n)
	}
	if counts := s.TargetCounts(); len(counts) > 0 {
		keys := make([]string, 0, len(counts))
		for k := range counts {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var parts []string
		for _, k := range keys {
			parts = append(parts, fmt.Sprintf("%s=%d", k, counts[k]))
		}
		fmt.Fprintf(w, "memprof: TARGETS not profiled or not completely (also in the profile's comments as targets_*): %s\n", strings.Join(parts, " "))
	}
	for _, f := range frags {
		if f.Coverage != "" {
			fmt.Fprintf(w, "coverage %s: %s\n", f.Scope, f.Coverage)
		}
		for _, n := range f.Notes {
			fmt.Fprintf(w, "NOT SEEN %s: %s\n", f.Scope, n)
		}
		if f.Err != nil {
			fmt.Fprintf(w, "fragmentation %s: %v\n", f.Scope, f.Err)
			continue
		}
		fmt.Fprintf(w, "fragmentation %s: %s\n", f.Scope, f.Verdict.Summary)
		if f.Regions != nil {
			fmt.Fprintf(w, "  compared: %s\n", f.Regions)
		}
		for _, a := range f.Verdict.Advice {
			fmt.Fprintf(w, "  advice: %s\n", a)
		}
	}
	rows, err := pprofout.Top(built, "inuse_space", top)
	if err == nil {
		if len(rows) == 0 {
			fmt.Fprintln(w, "\nno live sampled allocations")
		} else {
			fmt.Fprintf(w, "\ntop %d stacks by live bytes (inuse_space):\n", len(rows))
			_ = pprofout.FormatTop(w, rows, "inuse_space", 8) // the summary on a terminal: nothing to do if it fails
		}
	}
	fmt.Fprintf(w, "\nprofile written to %s\nview it with: go tool pprof -http=: %s\n", out, out)
	return out, nil
}

// checkOutput checks, before recording, that the profile can be written
// at path: its directory exists and a file can be created in it.
func checkOutput(path string) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return fmt.Errorf("-o %s is a directory: give a file name (e.g. %s)", path, filepath.Join(path, "heap.pb.gz"))
	}
	dir := filepath.Dir(path)
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("-o %s: directory %s does not exist (create it first): %w", path, dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("-o %s: %s is not a directory", path, dir)
	}
	f, err := os.CreateTemp(dir, ".memprof-check-*")
	if err != nil {
		return fmt.Errorf("-o %s: cannot write in %s (read-only?): %w", path, dir, err)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

// writeProfile writes the heap profile at path, with writeOrFallback.
func writeProfile(path string, p *pprofout.Profile, w io.Writer) (string, error) {
	return writeOrFallback(path, func(to string) error { return pprofout.WriteFile(to, p) }, w)
}

// writeOrFallback writes a profile at path with write; if that fails (disk
// full, the directory removed meanwhile), it writes it in $TMPDIR instead
// and says where on w, so the recording is not lost. It returns the path
// written.
func writeOrFallback(path string, write func(path string) error, w io.Writer) (string, error) {
	err := write(path)
	if err == nil {
		return path, nil
	}
	fallback := filepath.Join(os.TempDir(), fmt.Sprintf("memprof-%d-%s", os.Getpid(), filepath.Base(path)))
	if ferr := write(fallback); ferr != nil {
		return "", fmt.Errorf("write profile %s: %w; the fallback %s failed too: %w (the recording is lost)", path, err, fallback, ferr)
	}
	fmt.Fprintf(w, "memprof: WRITING %s FAILED: %v\nmemprof: the profile was saved to %s instead\n", path, err, fallback)
	return fallback, nil
}

// checkRecordFlags refuses, before anything is attached, a --sample-rate
// outside [1, recorder.MaxSampleRate] bytes and a --duration that is not
// positive.
func checkRecordFlags(c *cli.Context) error {
	rate := c.Uint64("sample-rate")
	if rate == 0 {
		return fmt.Errorf("--sample-rate must be at least 1 byte")
	}
	if rate > recorder.MaxSampleRate {
		return fmt.Errorf("--sample-rate %d is above the maximum of %d bytes (1 GiB): sampling that sparse shows nothing useful (default %d)", rate, recorder.MaxSampleRate, recorder.DefaultSampleRate)
	}
	if c.IsSet("duration") && c.Duration("duration") <= 0 {
		return fmt.Errorf("--duration must be positive, got %s (omit it to record until the targets exit or Ctrl-C)", c.Duration("duration"))
	}
	return nil
}

// podTargets resolves --pod (with --namespace, --container) into the
// containers' cgroup directories (v1 memory controller, else v2), the
// namespace/pod/node(/container) labels put on every sample and a name for
// the default output file. Without --pod it returns nothing.
func podTargets(c *cli.Context) (cgroups []string, labels map[string]string, target string, err error) {
	pod := c.String("pod")
	if pod == "" {
		return nil, nil, "", nil
	}
	conts, err := podfind.Discover(c.Context, podPathsFrom(c))
	if err != nil {
		return nil, nil, "", fmt.Errorf("find pods on this node: %w", err)
	}
	sel, err := podfind.Select(conts, pod, c.String("namespace"), c.String("container"))
	if err != nil {
		return nil, nil, "", err
	}
	for _, ct := range sel {
		dir := ct.CgroupV1Memory
		if dir == "" {
			dir = ct.CgroupV2
		}
		cgroups = append(cgroups, dir)
	}
	labels = map[string]string{"namespace": sel[0].Namespace, "pod": sel[0].Pod, "node": hostname()}
	if len(sel) == 1 {
		labels["container"] = sel[0].Name
	}
	return cgroups, labels, sel[0].Namespace + "-" + sel[0].Pod, nil
}
