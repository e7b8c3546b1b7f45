/* k8s_pause: the pod sandbox process of podfind's containerd test, linked
 * statically into a locally built image (no registry is reachable). */
#include <unistd.h>

int main(void) {
	for (;;)
		pause();
}
