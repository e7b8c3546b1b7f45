package main

import (
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/internal/podfind"
)

// podPathFlags are the host paths pod discovery reads; inside a container
// (the DaemonSet) they point at the host's mounts.
func podPathFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "proc-root", Value: "/proc", Usage: "the host's /proc"},
		&cli.StringFlag{Name: "cgroup-root", Value: "/sys/fs/cgroup", Usage: "the host's cgroup mount"},
		&cli.StringFlag{Name: "pod-logs", Value: "/var/log/pods", Usage: "the kubelet's pod log directory (names pods when no CRI socket answers)"},
		&cli.StringSliceFlag{Name: "cri-socket", Value: cli.NewStringSlice(podfind.DefaultPaths().CRISockets...), Usage: "CRI sockets to ask for pod names and annotations (comma-separated or repeated; absent ones are skipped)"},
	}
}

// podPathsFrom reads the flags of podPathFlags.
func podPathsFrom(c *cli.Context) podfind.Paths {
	return podfind.Paths{
		ProcRoot:   c.String("proc-root"),
		CgroupRoot: c.String("cgroup-root"),
		PodLogs:    c.String("pod-logs"),
		CRISockets: listFlag(c, "cri-socket"),
	}
}

// listFlag reads a repeatable flag whose values may also be
// comma-separated.
func listFlag(c *cli.Context, name string) []string {
	var out []string
	for _, s := range c.StringSlice(name) {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}
