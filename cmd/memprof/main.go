// Command memprof profiles the native heap of processes, cgroups and
// Kubernetes pods with eBPF, without touching the application.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

func main() {
	app := &cli.App{
		Name:  "memprof",
		Usage: "eBPF heap profiler for native processes and containers",
		Description: "memprof attaches uprobes to glibc's and jemalloc's allocator in the processes you name,\n" +
			"samples allocations by bytes, and writes pprof heap profiles (live and allocated bytes by\n" +
			"call stack), fragmentation verdicts and OOM-kill post-mortems.",
		Commands: []*cli.Command{
			recordCommand(),
			reportCommand(),
			agentCommand(),
		},
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "memprof:", err)
		os.Exit(1)
	}
}
