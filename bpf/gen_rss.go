package bpf

// The RSS tier (rss.bpf.c, rss.h) and the program that runs its decision
// logic under BPF_PROG_RUN in tests (rss_test.bpf.c).

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type rss_page_key -type rss_page -type rss_fault_key -type rss_oom_event -type rss_cpu Rss rss.bpf.c -- -I.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -mcpu=v3 -Wall -Werror -D__TARGET_ARCH_x86 -I/usr/include/x86_64-linux-gnu" -target amd64 -type rss_test_ctx -type rss_verdict RssTest rss_test.bpf.c -- -I.
