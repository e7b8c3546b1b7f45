// fc_dlmain: 300 ms after the start, loads a plugin (fc_plugin.c, no frame
// pointers) with dlopen, lets it allocate, unloads it with dlclose 600 ms
// later and exits at once: the plugin lives between two of the profiler's
// periodic rescans of the mappings (1 s apart), and when the profile is
// taken it is no longer mapped. Built by the tests with
// -O2 -fno-omit-frame-pointer -rdynamic -ldl. Truth, live at exit:
//   6 x 512 KiB = 3,145,728 B under  plug_inner <- plug_outer <- main
// (plug_* symbolized from the unloaded plugin).
// Usage: fc_dlmain PLUGIN.so (exits 0; 2 if the plugin cannot be loaded)
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

void *volatile kept[64];

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	usleep(300 * 1000);
	void *h = dlopen(argv[1], RTLD_NOW);
	if (!h) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return 2;
	}
	void (*outer)(int) = (void (*)(int))dlsym(h, "plug_outer");
	if (!outer)
		return 2;
	outer(6);
	usleep(600 * 1000);
	if (dlclose(h) != 0)
		return 2;
	return 0;
}
