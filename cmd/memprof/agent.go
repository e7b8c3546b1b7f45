package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/internal/agent"
	"github.com/memprof/memprof/internal/recorder"
)

func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run as the node agent (Kubernetes DaemonSet)",
		Description: "Profiles the pods of this node selected by the annotation memprof.io/profile: \"true\" (needs a CRI socket)\n" +
			"and/or --namespace, watches every container for OOM kills, and serves on --listen:\n" +
			"  /healthz, /metrics                         open\n" +
			"  /profiles, /profiles/heap?namespace=&pod=&container=[&seconds=N], /oom, /oom/file?path=\n" +
			"                                             Authorization: Bearer <token of --token-file>\n" +
			"See deploy/README.md.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:9464", Usage: "address to serve on (the manifest binds the pod IP)"},
			&cli.StringFlag{Name: "token-file", Usage: "file holding the bearer token for every endpoint but /healthz and /metrics (required; re-read when it changes)"},
			&cli.StringFlag{Name: "node-name", EnvVars: []string{"NODE_NAME"}, Usage: "node label of metrics and profiles (default: hostname)"},
			&cli.StringSliceFlag{Name: "namespace", Aliases: []string{"n"}, Usage: "profile every container of these namespaces (\"*\": all), besides annotated pods"},
			&cli.StringSliceFlag{Name: "exclude-namespace", Usage: "never profile these namespaces (alone: profile every other namespace)"},
			&cli.StringFlag{Name: "data-dir", Value: "/var/lib/memprof", Usage: "where periodic profiles (profiles/) and OOM post-mortems (oom/) are kept"},
			&cli.DurationFlag{Name: "profile-interval", Value: agentDefault.ProfileInterval, Usage: "how often each profiled container's heap profile is kept (and pushed)"},
			&cli.DurationFlag{Name: "retention", Value: agentDefault.Retention, Usage: "age after which kept profiles are deleted"},
			&cli.StringFlag{Name: "pyroscope-url", Usage: "push the periodic profiles to this Pyroscope server (POST /ingest, format pprof)"},
			&cli.Float64Flag{Name: "max-calls-per-second", Value: 200000, Usage: "overhead budget: a target process making more allocator calls per second is detached (0: no budget)"},
			&cli.Uint64Flag{Name: "sample-rate", Value: recorder.DefaultSampleRate, Usage: "mean bytes between samples (Poisson)"},
			&cli.DurationFlag{Name: "rediscover-interval", Usage: "how often the node's pods are listed again (default: 30s where cgroup events from BPF wake discovery at once, 5s without them)"},
			&cli.BoolFlag{Name: "no-rss", Usage: "no RSS profiles (by default every container on the node gets them, and every OOM kill an RSS post-mortem)"},
			&cli.DurationFlag{Name: "collect-interval", Value: agentDefault.CollectInterval, Usage: "how often metrics are computed and the budget checked"},
			&cli.StringFlag{Name: "log-format", Value: agent.LogText, Usage: "log records on stderr as \"text\" (key=value) or \"json\" (one object a line)"},
		}, podPathFlags()...),
		Action: runAgent,
	}
}

var agentDefault = agent.Config{ProfileInterval: 60e9, Retention: 24 * 3600e9, CollectInterval: 2e9}

func runAgent(c *cli.Context) error {
	if c.Uint64("sample-rate") == 0 {
		return fmt.Errorf("--sample-rate must be at least 1 byte")
	}
	lg, err := agent.NewLogger(os.Stderr, c.String("log-format"))
	if err != nil {
		return err
	}
	cfg := agent.Config{
		Listen:            c.String("listen"),
		TokenFile:         c.String("token-file"),
		NodeName:          c.String("node-name"),
		Paths:             podPathsFrom(c),
		Namespaces:        listFlag(c, "namespace"),
		ExcludeNamespaces: listFlag(c, "exclude-namespace"),
		DataDir:           c.String("data-dir"),
		ProfileInterval:   c.Duration("profile-interval"),
		Retention:         c.Duration("retention"),
		PyroscopeURL:      c.String("pyroscope-url"),
		MaxCallsPerSecond: c.Float64("max-calls-per-second"),
		SampleRate:        c.Uint64("sample-rate"),
		DiscoverInterval:  c.Duration("rediscover-interval"),
		CollectInterval:   c.Duration("collect-interval"),
		Log:               lg,
		NoRSS:             c.Bool("no-rss"),
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	return a.Run(ctx)
}
