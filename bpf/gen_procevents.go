package bpf

// The process and cgroup events of internal/procwatch (procevents.bpf.c,
// procevents.h): an object of its own, loaded by the recorder and the agent
// whether or not the allocation probes are.

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type pw_event -type pw_cgroup_event Procevents procevents.bpf.c -- -I.
