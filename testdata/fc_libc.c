// fc_libc: blocks that glibc helpers allocate on behalf of their caller, so
// the frames between malloc and the user's function are glibc's (built
// without frame pointers) while the program itself keeps frame pointers.
// Built by the tests with -O2 -fno-omit-frame-pointer. Truth, live at exit,
// each block under  fc_<name> <- main:
//   fc_strdup     strdup of a 50,000-char string           50,001 B
//   fc_asprintf   asprintf("%s") of a 60,000-char string   60,001 B
//   fc_getline    getline of a 40,000-char line (fmemopen)  40,001..80,122 B (glibc grows the buffer by doubling from 120)
//   fc_memstream  open_memstream, 30,000 B written, closed  30,001..60,002 B
//   fc_direct     malloc(20,000) in the caller itself        20,000 B
// Usage: fc_libc (runs and exits 0)
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))

void *volatile kept[8];
static char text[70000];

NOINLINE void fc_strdup(void) { text[50000] = 0; kept[0] = strdup(text); text[50000] = 'a'; }

NOINLINE void fc_asprintf(void)
{
	char *s = NULL;
	text[60000] = 0;
	if (asprintf(&s, "%s", text) < 0)
		exit(2);
	text[60000] = 'a';
	kept[1] = s;
}

NOINLINE void fc_getline(void)
{
	static char line[40002];
	memset(line, 'l', 40000);
	line[40000] = '\n';
	FILE *f = fmemopen(line, 40001, "r");
	char *l = NULL;
	size_t n = 0;
	if (!f || getline(&l, &n, f) != 40001)
		exit(3);
	fclose(f);
	kept[2] = l;
}

NOINLINE void fc_memstream(void)
{
	char *buf;
	size_t sz;
	FILE *m = open_memstream(&buf, &sz);
	if (!m || fwrite(text, 1, 30000, m) != 30000)
		exit(4);
	fclose(m);
	kept[3] = buf;
}

NOINLINE void fc_direct(void) { kept[4] = malloc(20000); }

int main(void)
{
	memset(text, 'a', sizeof text - 1);
	fc_strdup();
	fc_asprintf();
	fc_getline();
	fc_memstream();
	fc_direct();
	return 0;
}
