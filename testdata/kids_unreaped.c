// kids_unreaped PROG: forks a child that exits at once (left a zombie: not
// reaped until the end) and a child that execs PROG --pause; prints
// "started", and after a line on stdin kills the second child, reaps both
// and prints "done". kids_unreaped --pause: pauses until killed.
// Truth for --follow-children on it (PROG a stripped static build of this
// file): one child gone before any attach (the zombie), one that maps no
// allocator memprof can find.
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--pause")) {
		pause();
		return 0;
	}
	if (argc < 2)
		return 2;
	pid_t zombie = fork();
	if (zombie == 0)
		_exit(0);
	pid_t kid = fork();
	if (kid == 0) {
		execl(argv[1], argv[1], "--pause", (char *)0);
		_exit(9);
	}
	printf("started\n");
	fflush(stdout);
	char line[64];
	if (!fgets(line, sizeof line, stdin))
		return 3;
	kill(kid, SIGKILL);
	waitpid(kid, 0, 0);
	waitpid(zombie, 0, 0);
	printf("done\n");
	fflush(stdout);
	return 0;
}
