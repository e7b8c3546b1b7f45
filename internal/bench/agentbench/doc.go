// Package agentbench is the node agent's own-cost benchmark (`make
// bench-agent`): it builds memprof, runs `memprof agent` as a real process
// against N kubelet-style pods (cgroupfs driver, v1 memory controller,
// /var/log/pods names, no CRI socket), each one process of
// testdata/agent_workload.c allocating ~200 small blocks per second in
// batches every 50 ms, and prints for each N side by side:
//
//   - the agent's CPU as % of one core: utime+stime from /proc/PID/stat
//     over a fixed window (-window, default 30s) after every pod is
//     attached, with a Prometheus-style scrape of /metrics every 15 s in
//     the window. CPU time is the agent's own, so it is far less sensitive
//     to other work on the machine than wall-clock figures;
//   - its RSS, anonymous and total (RssAnon and VmRSS of /proc/PID/status,
//     the largest seen in the window) and its Go heap in use
//     (go_memstats_heap_inuse_bytes of the last scrape);
//   - the time from a container's start (its process joins the container's
//     cgroup) to its first profiled allocation: the agent logs "attached to
//     process PID" once the probes are in place, and the workload allocates
//     every 50 ms, so the first profiled allocation follows that line
//     within 50 ms. Pods are started while the agent runs, 20 per second;
//     the median and the largest are reported;
//   - the OOM kills the agent saw on the node in the window: it watches
//     every OOM kill of the machine and writes a report for each, so OOM
//     tests run by other work on the machine add to its CPU time.
//
// Run it as root:
//
//	go test -run '^$' -bench Agent -benchtime=1x -timeout 30m ./internal/bench/agentbench/
//
// Flags after -args: -pods (default 25,100,200), -window (default 30s),
// -perf DIR (record a perf CPU profile of the agent over each window into
// DIR/agent-N.data, for `perf report`), -memprof BIN (run that binary
// instead of building ./cmd/memprof: two versions back to back).
package agentbench
