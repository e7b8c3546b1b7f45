package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

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
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("report needs exactly one profile file (got %d arguments)", c.NArg())
			}
			p, err := pprofout.ReadFile(c.Args().First())
			if err != nil {
				return err
			}
			w := os.Stdout
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
