package main

import (
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/internal/recorder"
	"github.com/memprof/memprof/internal/report"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// ExitGrowth is record's exit status when --fail-on-growth trips.
const ExitGrowth = 3

var growthLimit = regexp.MustCompile(`^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*/\s*(s|sec|min|h)\s*$`)

// parseGrowthLimit parses "1MiB/min", "512KiB/s", "10MB/h" into bytes per
// minute (KiB = 1024, KB = 1000); "" is no limit (-1).
func parseGrowthLimit(s string) (float64, error) {
	if s == "" {
		return -1, nil
	}
	m := growthLimit.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("--fail-on-growth %q: give a rate such as 1MiB/min, 512KiB/s or 10MB/h", s)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	unit := map[string]float64{"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[m[2]]
	per := map[string]float64{"s": 1.0 / 60, "sec": 1.0 / 60, "min": 1, "h": 60}[m[3]]
	return v * unit / per, nil
}

// writeSeries stops the series, writes it next to the profile and, with a
// limit (>= 0), applies the leak gate to the profile and its series.
func writeSeries(rec *recorder.SeriesRecorder, out string, limit float64, w io.Writer) error {
	s, err := rec.Stop()
	if err != nil {
		return fmt.Errorf("read the series: %w", err)
	}
	path := series.SidecarPath(out)
	if err := series.WriteFile(path, s); err != nil {
		return err
	}
	fmt.Fprintf(w, "memory over time (%d points, %d stacks holding memory) written to %s; read both with: memprof report %s\n", len(s.TimesMS), len(s.Stacks), path, out)
	if limit < 0 {
		return nil
	}
	rep, err := report.Load(out)
	if err != nil {
		return err
	}
	leaks := rep.Leaks(limit)
	if len(leaks) == 0 {
		fmt.Fprintf(w, "leak gate: no stack growing faster than %s/min\n", pprofout.HumanBytes(int64(limit)))
		return nil
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "leak gate: %d stack(s) growing faster than %s/min:\n", len(leaks), pprofout.HumanBytes(int64(limit)))
	for _, st := range leaks {
		fmt.Fprintf(&sb, "  %s/min (%s confidence), live %s:\n", pprofout.HumanBytes(int64(st.Growth.RatePerMin)), st.Growth.Confidence, pprofout.HumanBytes(st.InuseBytes))
		for i, f := range st.Frames {
			if i == 6 {
				fmt.Fprintf(&sb, "      ... %d more\n", len(st.Frames)-i)
				break
			}
			fmt.Fprintf(&sb, "      %s\n", f)
		}
	}
	return cli.Exit(strings.TrimRight(sb.String(), "\n"), ExitGrowth)
}
