package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/internal/recorder"
	"github.com/memprof/memprof/internal/rss"
	"github.com/memprof/memprof/pprofout"
)

// runRecordRSS is `memprof record --rss`: the RSS tier alone (page-fault
// tracepoints, no uprobes).
func runRecordRSS(c *cli.Context) error {
	opts := rss.Options{
		SampleRate:    c.Uint64("sample-rate"),
		Pids:          c.IntSlice("pid"),
		Cgroups:       c.StringSlice("cgroup"),
		Command:       c.Args().Slice(),
		FramePointers: c.String("stack-mode") == "fp",
		AllOOMs:       c.Bool("all-ooms"),
	}
	if err := checkRecordFlags(c); err != nil {
		return err
	}
	target := describeTarget(recorder.Options{Pids: opts.Pids, Cgroups: opts.Cgroups, Command: opts.Command})
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
		out = fmt.Sprintf("memprof-%s-%s.rss.pb.gz", target, time.Now().Format("20060102-150405"))
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	oomDir := c.String("oom-dir")
	if oomDir == "" {
		oomDir = filepath.Dir(out)
	}
	stderr := pprofout.PrintableWriter(os.Stderr) // names the targets chose: escaped
	opts.Notify = func(msg string) { fmt.Fprintln(stderr, "memprof:", msg) }
	opts.OOM = func(k *rss.OOMKill) {
		if k.Profile == nil {
			fmt.Fprintf(stderr, "memprof: OOM kill of pid %d (%s), not a target\n", k.Pid, pprofout.Printable(k.Comm))
			return
		}
		path, err := rss.WriteOOM(k, oomDir)
		if err != nil {
			fmt.Fprintf(stderr, "memprof: OOM kill of pid %d (%s): writing the RSS post-mortem failed: %v\n", k.Pid, pprofout.Printable(k.Comm), err)
			return
		}
		fmt.Fprintf(stderr, "memprof: OOM KILL of pid %d (%s): RSS post-mortem written: %s\n", k.Pid, pprofout.Printable(k.Comm), path)
	}
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if c.Bool("heap") {
		return runRecordBoth(ctx, c, opts, out, podLabels)
	}
	s, err := rss.Start(ctx, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Fprintf(stderr, "memprof: recording RSS of %s (sample rate %d bytes; page-fault tracepoints, no uprobes)\n", target, opts.SampleRate)
	reason := s.Wait(ctx, c.Duration("duration"))
	fmt.Fprintf(stderr, "memprof: stopped: %s after %s\n", reason, time.Since(s.StartTime()).Round(time.Millisecond))
	return writeRSSResult(s, out, podLabels, c.Int("top"))
}

// writeRSSResult writes the RSS profile and prints its summary.
func writeRSSResult(s *rss.Session, out string, podLabels map[string]string, top int) error {
	stderr := pprofout.PrintableWriter(os.Stderr) // names the targets chose: escaped
	p, sums, err := s.Profile(nil)
	if err != nil {
		return err
	}
	for i := range p.Samples {
		for k, v := range podLabels {
			p.Samples[i].Labels[k] = v
		}
	}
	out, err = writeOrFallback(out, func(to string) error { return pprofout.WriteRSSFile(to, p) }, stderr)
	if err != nil {
		return err
	}
	cn, _ := s.Counters()
	fmt.Fprintf(stderr, "\nmemprof: %d anonymous page faults seen (%s), %d sampled\n", cn.Folios, pprofout.HumanBytes(int64(cn.Bytes)), cn.Samples)
	if lost := cn.Lost(); len(lost) > 0 {
		fmt.Fprintf(stderr, "memprof: LOST (also in the profile's comments): %v\n", lost)
	}
	if st := s.StackStats(); st.Truncated+st.Unknown > 0 {
		fmt.Fprintln(stderr, truncatedLine(st))
	}
	for _, sm := range sums {
		fmt.Fprintf(stderr, "pid %d (%s): RssAnon %s, attributed to stacks %s, %s %s\n", sm.Pid, pprofout.Printable(sm.Comm),
			pprofout.HumanBytes(sm.RssAnon), pprofout.HumanBytes(sm.Attributed), rss.ResidentBefore, pprofout.HumanBytes(sm.Before))
	}
	if built, err := pprofout.BuildRSS(p); err == nil {
		if rows, err := pprofout.Top(built, pprofout.RSSSpace, top); err == nil && len(rows) > 0 {
			fmt.Fprintf(stderr, "\ntop %d stacks by resident bytes (rss_space):\n", len(rows))
			_ = pprofout.FormatTop(stderr, rows, pprofout.RSSSpace, 8) // the summary on a terminal
		}
	}
	fmt.Fprintf(stderr, "\nRSS profile written to %s\nview it with: go tool pprof -http=: %s\n", out, out)
	return nil
}

// runRecordBoth records the heap (allocator probes) and RSS (page faults) of
// the same targets in one recording: two profiles, and a summary comparing
// them per process.
func runRecordBoth(ctx context.Context, c *cli.Context, ropts rss.Options, out string, podLabels map[string]string) error {
	stderr := pprofout.PrintableWriter(os.Stderr) // names the targets chose: escaped
	command := ropts.Command
	ropts.Command, ropts.AllowEmpty = nil, true
	rs, err := rss.Start(ctx, ropts)
	if err != nil {
		return err
	}
	defer rs.Close()
	hopts := recorder.Options{
		SampleRate: ropts.SampleRate,
		Pids:       ropts.Pids,
		Cgroups:    ropts.Cgroups,
		Command:    command,
		AllOOMs:    ropts.AllOOMs,
		StackMode:  c.String("stack-mode"),
		// One set of unwind tables for both tiers.
		UnwindTables: rs.UnwindTables(),
		Notify:       ropts.Notify,
		AtExec: func(pid int) {
			if err := rs.AddCommand(pid); err != nil {
				fmt.Fprintf(stderr, "memprof: RSS of the command: %v\n", err)
			}
		},
		AtExit: rs.Freeze,
	}
	hs, err := recorder.Start(ctx, hopts)
	if err != nil {
		return err
	}
	defer hs.Close()
	fmt.Fprintf(stderr, "memprof: recording heap and RSS (sample rate %d bytes); %s\n", hopts.SampleRate, hs.Features())
	reason := hs.Wait(ctx, c.Duration("duration"))
	fmt.Fprintf(stderr, "memprof: stopped: %s after %s\n", reason, time.Since(hs.StartTime()).Round(time.Millisecond))
	out, err = writeResult(hs, out, podLabels, c.Int("top"), stderr)
	if err != nil {
		return err
	}
	rssOut := strings.TrimSuffix(out, ".pb.gz") + ".rss.pb.gz"
	if err := writeRSSResult(rs, rssOut, podLabels, c.Int("top")); err != nil {
		return err
	}
	// Heap against RSS, per process.
	hp, err := hs.Profile()
	if err != nil {
		return err
	}
	built, err := pprofout.Build(hp)
	if err != nil {
		return err
	}
	live := recorder.LiveByPid(built)
	rp, sums, err := rs.Profile(nil)
	if err != nil {
		return err
	}
	cats := rss.Categorize(rp)
	fmt.Fprintln(stderr, "\nheap against RSS, per process (anonymous memory):")
	for _, sm := range sums {
		b := cats[sm.Pid]
		if b == nil {
			b = &rss.Breakdown{}
		}
		r := sm.Regions
		fmt.Fprintf(stderr, "  pid %d (%s): RssAnon %s; live heap (allocator probes) %s\n", sm.Pid, pprofout.Printable(sm.Comm), pprofout.HumanBytes(sm.RssAnon), pprofout.HumanBytes(live[sm.Pid]))
		fmt.Fprintf(stderr, "    by mapping: brk heap %s, anonymous mappings (allocator mmaps, own mmaps, thread stacks) %s, main stack %s, written file data %s, resident before recording %s\n",
			pprofout.HumanBytes(r.Brk), pprofout.HumanBytes(r.Anon), pprofout.HumanBytes(r.Stack), pprofout.HumanBytes(r.Data), pprofout.HumanBytes(sm.Before))
		fmt.Fprintf(stderr, "    by faulting stack: inside allocator functions %s, elsewhere (the program touching its blocks or own mappings) %s\n",
			pprofout.HumanBytes(b.Allocator), pprofout.HumanBytes(b.Other))
	}
	return nil
}

// truncatedLine is the summary's line on the sampled faults whose stacks
// are truncated, by cause (the causes add up to the total), and on those
// with no stack at all.
func truncatedLine(st rss.StackStats) string {
	other := st.Truncated - min(st.Truncated, st.Pending+st.NoMapping)
	return fmt.Sprintf("memprof: %d of %d sampled faults have a truncated stack (%d: unwind table not built yet, %d: a return address in no mapping listed: code mapped since the last scan, or a corrupt stack, %d: frame limit or unreadable frame), %d no stack at all ([stack unavailable])",
		st.Truncated, st.Samples, st.Pending, st.NoMapping, other, st.Unknown)
}
