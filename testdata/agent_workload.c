/* agent_workload: the workloads of the memprof agent tests.
 *
 *   agent_workload leak TOTAL BLOCK   print "waiting"; on SIGUSR1 leak TOTAL
 *                                     bytes in BLOCK-byte blocks from
 *                                     agent_leak_known() (every page touched),
 *                                     print "leaked TOTAL", then churn: every
 *                                     100 ms agent_churn_step() allocates and
 *                                     frees 16 blocks of 64 KiB (10 MiB/s)
 *   agent_workload oom BLOCK          print "waiting"; on SIGUSR1 leak BLOCK-byte
 *                                     blocks from agent_oom_grow() until killed
 *   agent_workload brief MS BYTES     allocate BYTES in 4 KiB blocks from
 *                                     agent_brief_alloc() over MS ms, then exit
 *   agent_workload spawn N MS BYTES   start N "brief" children (fork), one every
 *                                     MS/4 ms, wait for all, print "done"
 *   agent_workload hot                call malloc/free in a tight loop forever
 *   agent_workload trickle PROCS RATE write its own pid to PROCS (a cgroup's
 *                                     cgroup.procs: it joins that container),
 *                                     print "joined NS" (CLOCK_REALTIME ns after
 *                                     the write), then allocate RATE small blocks
 *                                     (64..2048 bytes) per second from
 *                                     agent_trickle_alloc(), in batches every
 *                                     50 ms, keeping the last 256 live, forever
 *   agent_workload first PROCS        join the cgroup of PROCS as trickle does,
 *                                     then allocate block i
 *                                     (i = 0..11) of 4096 << i bytes from
 *                                     agent_first_alloc() FIRST_MS[i] ms after
 *                                     the join (0, 2, 5, 10, 20, 50, 100, 200,
 *                                     500, 1000, 2000, 4000), all kept live: the bytes of
 *                                     agent_first_alloc a profile holds tell
 *                                     which blocks were seen; then print
 *                                     "joined NS" (the join, CLOCK_REALTIME) and
 *                                     "done", and sleep until killed
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int sig) { (void)sig; go = 1; }

static void **keep;
static size_t nkeep, capkeep;

static void hold(void *p)
{
	if (nkeep == capkeep) {
		capkeep = capkeep ? capkeep * 2 : 1024;
		keep = realloc(keep, capkeep * sizeof *keep);
	}
	keep[nkeep++] = p;
}

__attribute__((noinline)) void *agent_leak_known(size_t size)
{
	void *p = malloc(size);
	if (p)
		memset(p, 0x5a, size);
	return p;
}

__attribute__((noinline)) void agent_churn_step(void)
{
	void *b[16];
	for (int i = 0; i < 16; i++) {
		b[i] = malloc(64 << 10);
		if (b[i])
			((volatile char *)b[i])[0] = 1;
	}
	for (int i = 0; i < 16; i++)
		free(b[i]);
}

__attribute__((noinline)) void *agent_oom_grow(size_t size)
{
	void *p = malloc(size);
	if (p)
		memset(p, 0xa5, size);
	return p;
}

__attribute__((noinline)) void *agent_brief_alloc(size_t size)
{
	void *p = malloc(size);
	if (p)
		memset(p, 1, 64);
	return p;
}

__attribute__((noinline)) void *agent_trickle_alloc(size_t size)
{
	void *p = malloc(size);
	if (p)
		((volatile char *)p)[0] = 1;
	return p;
}

__attribute__((noinline)) void *agent_first_alloc(size_t size)
{
	void *p = malloc(size);
	if (p)
		((volatile char *)p)[0] = 1;
	return p;
}

static const long first_ms[12] = {0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4000};

static long long now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

static void wait_usr1(void)
{
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigprocmask(SIG_BLOCK, &block, &old);
	printf("waiting\n");
	while (!go)
		sigsuspend(&old);
	sigprocmask(SIG_SETMASK, &old, NULL);
}

static void brief(long ms, size_t bytes)
{
	size_t n = bytes / 4096, i;
	for (i = 0; i < n; i++) {
		hold(agent_brief_alloc(4096));
		if (n >= 10 && i % (n / 10) == 0)
			sleep_ms(ms / 10);
	}
	sleep_ms(ms / 10);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	if (argc >= 4 && strcmp(argv[1], "leak") == 0) {
		size_t total = strtoull(argv[2], NULL, 0), block = strtoull(argv[3], NULL, 0);
		wait_usr1();
		for (size_t done = 0; done < total; done += block)
			hold(agent_leak_known(block));
		printf("leaked %zu\n", total);
		for (;;) {
			agent_churn_step();
			sleep_ms(100);
		}
	}
	if (argc >= 3 && strcmp(argv[1], "oom") == 0) {
		size_t block = strtoull(argv[2], NULL, 0), total = 0;
		wait_usr1();
		for (;;) {
			void *p = agent_oom_grow(block);
			if (!p) {
				printf("malloc failed after %zu\n", total);
				return 4;
			}
			hold(p);
			total += block;
		}
	}
	if (argc >= 4 && strcmp(argv[1], "brief") == 0) {
		brief(atol(argv[2]), strtoull(argv[3], NULL, 0));
		return 0;
	}
	if (argc >= 5 && strcmp(argv[1], "spawn") == 0) {
		int n = atoi(argv[2]);
		long ms = atol(argv[3]);
		size_t bytes = strtoull(argv[4], NULL, 0);
		for (int i = 0; i < n; i++) {
			pid_t pid = fork();
			if (pid == 0) {
				brief(ms, bytes);
				_exit(0);
			}
			sleep_ms(ms / 4);
		}
		while (wait(NULL) > 0)
			;
		printf("done\n");
		return 0;
	}
	if (argc >= 2 && strcmp(argv[1], "hot") == 0) {
		printf("hot\n");
		for (;;) {
			void *p = malloc(32);
			((volatile char *)p)[0] = 1;
			free(p);
		}
	}
	if (argc >= 3 && strcmp(argv[1], "first") == 0) {
		FILE *f = fopen(argv[2], "w");
		if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
			perror(argv[2]);
			return 3;
		}
		long long t0 = now_ns(CLOCK_MONOTONIC), wall = now_ns(CLOCK_REALTIME);
		for (int i = 0; i < 12; i++) {
			long long at = t0 + first_ms[i] * 1000000LL, now = now_ns(CLOCK_MONOTONIC);
			if (at > now) {
				struct timespec ts = {(at - now) / 1000000000LL, (at - now) % 1000000000LL};
				nanosleep(&ts, NULL);
			}
			hold(agent_first_alloc((size_t)4096 << i));
		}
		printf("joined %lld\ndone\n", wall);
		for (;;)
			pause();
	}
	if (argc >= 4 && strcmp(argv[1], "trickle") == 0) {
		FILE *f = fopen(argv[2], "w");
		if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
			perror(argv[2]);
			return 3;
		}
		struct timespec now;
		clock_gettime(CLOCK_REALTIME, &now);
		printf("joined %lld\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
		long rate = atol(argv[3]), batch = rate / 20 > 0 ? rate / 20 : 1;
		void *ring[256] = {0};
		unsigned long n = 0;
		for (;;) {
			for (long i = 0; i < batch; i++, n++) {
				free(ring[n % 256]);
				ring[n % 256] = agent_trickle_alloc(64 << (n % 6));
			}
			sleep_ms(50);
		}
	}
	fprintf(stderr, "usage: %s leak TOTAL BLOCK | oom BLOCK | brief MS BYTES | spawn N MS BYTES | hot | trickle PROCS RATE | first PROCS\n", argv[0]);
	return 2;
}
