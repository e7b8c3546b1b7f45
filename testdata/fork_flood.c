/* fork_flood: a tenant's fork+exit flood, for the cost tests and benchmarks
 * of internal/procwatch. It moves itself into the cgroups whose cgroup.procs
 * files it is given, prints "READY" and waits for a line on stdin, then forks
 * children that _exit(0) at once (each reaped before the next fork) for MS
 * milliseconds, at most RATE forks per second (0: as fast as it can), and
 * prints the truth the tests check: "DONE forks=N ms=T". With
 * FORK_FLOOD_EXEC=PATH in its environment each child execs PATH (no
 * arguments) instead: a shell loop's fork+exec+exit.
 *
 * Usage: fork_flood MS RATE [CGROUP_PROCS...] */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: fork_flood MS RATE [CGROUP_PROCS...]\n");
		return 2;
	}
	long long ms = atoll(argv[1]), rate = atoll(argv[2]);
	const char *ex = getenv("FORK_FLOOD_EXEC");
	for (int i = 3; i < argc; i++) {
		FILE *f = fopen(argv[i], "w");
		if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
			perror(argv[i]);
			return 1;
		}
	}
	printf("READY\n");
	fflush(stdout);
	char line[64];
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	long long start = now_ns(), end = start + ms * 1000000LL, forks = 0, t;
	while ((t = now_ns()) < end) {
		if (rate > 0 && forks * 1000000000LL > (t - start) * rate) {
			/* ahead of the rate: wait for the next fork's time */
			long long due = start + forks * 1000000000LL / rate;
			struct timespec d = {(due - t) / 1000000000LL, (due - t) % 1000000000LL};
			nanosleep(&d, NULL);
			continue;
		}
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			if (ex)
				execl(ex, ex, (char *)NULL);
			_exit(0);
		}
		if (waitpid(pid, NULL, 0) != pid) {
			perror("waitpid");
			return 1;
		}
		forks++;
	}
	printf("DONE forks=%lld ms=%lld\n", forks, (now_ns() - start) / 1000000LL);
	fflush(stdout);
	return 0;
}
