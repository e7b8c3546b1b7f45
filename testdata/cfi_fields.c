// Stacks that a frame-pointer walk gets wrong, for the CFI walk in BPF
// (TestCFIFieldCases, TestCFITightLoop). Built with -O2
// -fomit-frame-pointer.
//
//   cfi_fields helpers <dir> [delay_ms]: after delay_ms (startup work), glibc allocating for its caller, each block
//     live at exit under its f_* caller <- main:
//       f_strdup    strdup of 99,999 chars        100,000 B
//       f_asprintf  asprintf("%s") of the same    100,000 B
//       f_getline   getline of a 99,999-char line (glibc's buffer, its size
//                   is glibc's choice: counted, not asserted)
//       f_direct    malloc(100000)                100,000 B
//       f_plugin    dlopen(<dir>/libcfi_plug.so), plug_outer -> plug_inner
//                   -> malloc(8 MiB)             8,388,608 B
//   cfi_fields loop <n>: n blocks of 64 B kept live, allocated in a tight
//     loop by loop_leaf <- loop_mid <- main (n * 64 B).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void *volatile keep[8];
static char big[100000];

#define NOT_TAIL() __asm__ volatile("" ::: "memory")

__attribute__((noinline)) void f_strdup(void) { keep[0] = strdup(big); NOT_TAIL(); }

__attribute__((noinline)) void f_asprintf(void)
{
	char *s = NULL;
	if (asprintf(&s, "%s", big) < 0)
		exit(2);
	keep[1] = s;
	NOT_TAIL();
}

__attribute__((noinline)) void f_getline(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		exit(3);
	char *l = NULL;
	size_t n = 0;
	if (getline(&l, &n, f) < 0)
		exit(4);
	keep[2] = l;
	fclose(f);
	NOT_TAIL();
}

__attribute__((noinline)) void f_direct(void) { keep[3] = malloc(100000); NOT_TAIL(); }

__attribute__((noinline)) void f_plugin(const char *dir)
{
	static char path[4096]; // static: the frame stays small (see TestCFIFieldCases)
	snprintf(path, sizeof(path), "%s/libcfi_plug.so", dir);
	void *h = dlopen(path, RTLD_NOW);
	if (!h) {
		fprintf(stderr, "%s\n", dlerror());
		exit(5);
	}
	void (*outer)(size_t) = (void (*)(size_t))dlsym(h, "plug_outer");
	outer(8 << 20);
	NOT_TAIL();
}

void **blocks;

__attribute__((noinline)) void loop_leaf(long i) { blocks[i] = malloc(64); NOT_TAIL(); }

__attribute__((noinline)) void loop_mid(long n)
{
	for (long i = 0; i < n; i++)
		loop_leaf(i);
	NOT_TAIL();
}

int main(int argc, char **argv)
{
	if (argc >= 3 && strcmp(argv[1], "helpers") == 0) {
		if (argc == 4) {
			long ms = atol(argv[3]);
			struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
			nanosleep(&ts, NULL);
		}
		memset(big, 'x', sizeof(big) - 1);
		static char line[4096];
		snprintf(line, sizeof(line), "%s/line.txt", argv[2]);
		FILE *f = fopen(line, "w");
		if (!f)
			return 1;
		fwrite(big, 1, sizeof(big) - 1, f);
		fputc('\n', f);
		fclose(f);
		f_strdup();
		f_asprintf();
		f_getline(line);
		f_direct();
		f_plugin(argv[2]);
		return 0;
	}
	if (argc == 3 && strcmp(argv[1], "loop") == 0) {
		long n = atol(argv[2]);
		blocks = calloc(n, sizeof(void *)); // not under loop_mid
		loop_mid(n);
		return 0;
	}
	fprintf(stderr, "usage: cfi_fields helpers <dir> [delay_ms] | loop <n>\n");
	return 1;
}
