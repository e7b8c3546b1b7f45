/* notheap: anonymous memory that is not the allocator's, next to a small
 * malloc heap, for the fragmentation verdict's tests
 * (internal/recorder/coverage_test.go). No fragmentation at all.
 *
 *   notheap mmap SECONDS     f_arena: 200 MiB of the program's own mmap,
 *                            touched; f_heap: 5 x 1 MiB malloc'd, touched.
 *   notheap threads SECONDS  200 threads each touching 256 KiB of its stack
 *                            (50 MiB of stacks); f_heap as above.
 *   notheap before SECONDS   f_before: 16384 x 4 KiB malloc'd and touched, then
 *                            "ready" on stdout, a line read from stdin, and
 *                            f_heap (5 MiB) after it: attach in between.
 *   notheap late SECONDS     no malloc call, no stdio: after 2 s, 64 MiB of
 *                            its own mmap, touched (memory memprof cannot see)
 * Then prints "done" and sleeps SECONDS.
 * Truth: f_heap 5,242,880 live; f_before 67,108,864 live; nothing freed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void *volatile keep[128];

__attribute__((noinline)) void f_arena(void) {
	size_t n = 200u << 20;
	char *a = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(a, 1, n);
	keep[0] = a;
}

__attribute__((noinline)) void f_heap(void) {
	for (int i = 0; i < 5; i++) {
		keep[1 + i] = malloc(1 << 20);
		memset(keep[1 + i], 1, 1 << 20);
	}
}

void *volatile before[16384];

__attribute__((noinline)) void f_before(void) {
	for (int i = 0; i < 16384; i++) {
		before[i] = malloc(4096);
		memset(before[i], 1, 4096);
	}
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int started;

static void *worker(void *arg) {
	volatile char buf[256 * 1024];
	memset((char *)buf, 1, sizeof buf);
	pthread_mutex_lock(&mu);
	started++;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	pause();
	return (void *)(long)buf[5];
}

int main(int argc, char **argv) {
	if (argc < 3)
		return 2;
	int secs = atoi(argv[2]);
	if (strcmp(argv[1], "mmap") == 0) {
		f_arena();
		f_heap();
	} else if (strcmp(argv[1], "threads") == 0) {
		f_heap();
		for (int i = 0; i < 200; i++) {
			pthread_t t;
			pthread_attr_t at;
			pthread_attr_init(&at);
			pthread_attr_setstacksize(&at, 1 << 20);
			pthread_create(&t, &at, worker, 0);
		}
		pthread_mutex_lock(&mu);
		while (started < 200)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
	} else if (strcmp(argv[1], "before") == 0) {
		f_before();
		printf("ready\n");
		fflush(stdout);
		char line[64];
		if (!fgets(line, sizeof line, stdin))
			return 1;
		f_heap();
	} else if (strcmp(argv[1], "late") == 0) {
		sleep(2);
		size_t n = 64u << 20;
		char *a = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		memset(a, 1, n);
		keep[0] = a;
		sleep(secs);
		return 0;
	} else {
		return 2;
	}
	printf("done\n");
	fflush(stdout);
	sleep(secs);
	return 0;
}
