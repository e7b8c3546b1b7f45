package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/internal/report"
	"github.com/memprof/memprof/pprofout"
)

func reportCommand() *cli.Command {
	return &cli.Command{
		Name:      "report",
		Usage:     "print the top stacks, fragmentation figures and losses recorded in a memprof profile",
		ArgsUsage: "FILE",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "sample-index", Usage: "inuse_space, inuse_objects, alloc_space or alloc_objects; for RSS profiles rss_space, faulted_space or faulted_objects (default: the profile's default)"},
			&cli.IntFlag{Name: "top", Value: 10, Usage: "stacks to show"},
			&cli.IntFlag{Name: "frames", Value: 8, Usage: "frames per stack"},
			&cli.StringFlag{Name: "format", Value: "text", Usage: "text, or json: per stack frames, inuse and alloc bytes, trend, growth rate and series"},
			&cli.StringFlag{Name: "html", Usage: "also write one self-contained HTML report (flame graph, timeline, growth table) to this file"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("report needs exactly one profile file (got %d arguments)", c.NArg())
			}
			rep, err := report.Load(c.Args().First())
			if err != nil {
				return err
			}
			if out := c.String("html"); out != "" {
				if err := writeHTMLReport(out, rep); err != nil {
					return err
				}
				fmt.Fprintf(os.Stderr, "memprof: HTML report written to %s\n", out)
			}
			switch c.String("format") {
			case "json":
				return report.WriteJSON(os.Stdout, rep)
			case "text":
			default:
				return fmt.Errorf("unknown --format %q: use text or json", c.String("format"))
			}
			p, err := pprofout.ReadFile(c.Args().First())
			if err != nil {
				return err
			}
			w := pprofout.PrintableWriter(os.Stdout) // names in a profile are the target's
			fmt.Fprintf(w, "profile %s: %d samples, sample rate %d bytes, duration %s\n",
				c.Args().First(), len(p.Sample), p.Period, fmtDuration(p.DurationNanos))
			var frag, lost, other []string
			for _, cm := range p.Comments {
				kv, ok := strings.CutPrefix(cm, "memprof: ")
				switch {
				case !ok:
					other = append(other, cm)
				case strings.HasPrefix(kv, "frag"):
					frag = append(frag, kv)
				case strings.HasPrefix(kv, "lost_"):
					lost = append(lost, kv)
				default:
					other = append(other, kv)
				}
			}
			if len(frag) > 0 {
				fmt.Fprintln(w, "\nfragmentation:")
				for _, f := range frag {
					fmt.Fprintln(w, "  "+f)
				}
			}
			if len(lost) > 0 {
				fmt.Fprintln(w, "\nLOST events:")
				for _, l := range lost {
					fmt.Fprintln(w, "  "+l)
				}
			}
			index := c.String("sample-index")
			if index == "" {
				index = p.DefaultSampleType
			}
			if index == "" {
				index = "inuse_space"
			}
			rows, err := pprofout.Top(p, index, c.Int("top"))
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "\ntop %d stacks by %s:\n", len(rows), index)
			if err := pprofout.FormatTop(w, rows, index, c.Int("frames")); err != nil {
				return err
			}
			if err := report.WriteGrowth(w, rep, c.Int("top"), c.Int("frames")); err != nil {
				return err
			}
			if len(other) > 0 {
				fmt.Fprintln(w, "\nnotes:")
				for _, o := range other {
					fmt.Fprintln(w, "  "+o)
				}
			}
			return nil
		},
	}
}

func fmtDuration(ns int64) string {
	if ns <= 0 {
		return "0s (snapshot)"
	}
	return fmt.Sprintf("%.1fs", float64(ns)/1e9)
}

func writeHTMLReport(path string, rep *report.Report) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create HTML report: %w", err)
	}
	if err := report.WriteHTML(f, rep); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}
