// demo_server: a toy request loop with the three memory behaviours memprof
// tells apart, for `make demo`:
//   - session_open leaks a 4 KiB session per request (a real leak),
//   - cache_put keeps a bounded LRU-ish cache of 64 KiB entries (live data),
//   - parse_request allocates a scratch buffer and frees it (churn: only in
//     alloc_space).
// It serves 20,000 "requests" in about six seconds and exits: long enough for
// `memprof report` to see session_open grow and the cache stay steady.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NOINLINE __attribute__((noinline))

struct session {
	char user[64];
	char state[4096 - 64];
};

static void *cache[256];

NOINLINE struct session *session_open(int id)
{
	struct session *s = malloc(sizeof *s);
	snprintf(s->user, sizeof s->user, "user-%d", id);
	memset(s->state, 0, sizeof s->state);
	return s; // never closed: leaks
}

NOINLINE void cache_put(int key)
{
	int slot = key % 256;
	free(cache[slot]);
	cache[slot] = malloc(64 * 1024);
	memset(cache[slot], key, 64);
}

NOINLINE size_t parse_request(int id)
{
	char *scratch = malloc(16 * 1024);
	int n = snprintf(scratch, 16 * 1024, "GET /item/%d HTTP/1.1", id);
	size_t h = 0;
	for (int i = 0; i < n; i++)
		h = h * 31 + scratch[i];
	free(scratch);
	return h;
}

NOINLINE void handle_request(int id)
{
	volatile size_t h = parse_request(id);
	(void)h;
	session_open(id);
	cache_put(id);
}

int main(void)
{
	struct timespec pause = {0, 2500000}; // 2.5 ms every 10 requests
	for (int id = 0; id < 20000; id++) {
		handle_request(id);
		if (id % 10 == 0)
			nanosleep(&pause, NULL);
	}
	printf("served 20000 requests\n");
	return 0;
}
