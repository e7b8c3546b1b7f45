// Command memprof profiles the memory of processes, cgroups and Kubernetes
// pods with eBPF, without touching the application: the heap tier (uprobes on
// the allocator) and the RSS tier (page-fault tracepoints).
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/memprof/memprof/pprofout"
)

func main() {
	app := &cli.App{
		Name:  "memprof",
		Usage: "eBPF memory profiler for processes and containers: heap (allocator uprobes) and RSS (page faults)",
		Description: "Heap tier (record, the agent's opted-in pods): uprobes on the allocator (glibc, jemalloc,\n" +
			"also statically linked under a prefix, tcmalloc, mimalloc, musl) in the processes you name;\n" +
			"allocations sampled by bytes (Poisson) into pprof heap profiles (inuse_space, alloc_space by\n" +
			"call stack), with fragmentation verdicts (RSS against live allocations). Exact, one trap per\n" +
			"allocator call.\n\n" +
			"RSS tier (record --rss, the agent's default for every container): page-fault tracepoints\n" +
			"attribute resident anonymous memory to the stacks that faulted it in (rss_space,\n" +
			"faulted_space), for every language (C/C++, Go, Python, the JVM), at near-zero cost.\n\n" +
			"Both give OOM-kill post-mortems: what held the memory when the kernel killed a process.",
		Commands: []*cli.Command{
			recordCommand(),
			reportCommand(),
			agentCommand(),
		},
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(pprofout.PrintableWriter(os.Stderr), "memprof:", err) // errors may quote names a target chose
		os.Exit(1)
	}
}
