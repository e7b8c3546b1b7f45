/* k8s_sleeper: the workload of podfind's runc container test. It links libc
 * dynamically (so the container maps its own copy), touches the heap so malloc
 * is initialised, prints a line and waits until killed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
	char *p = malloc(1 << 16);
	if (p == NULL)
		return 1;
	memset(p, 1, 1 << 16);
	printf("k8s_sleeper %d ready\n", (int)getpid());
	fflush(stdout);
	for (;;)
		pause();
}
