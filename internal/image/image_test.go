package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/memprof/memprof/internal/testprog"
)

// TestBuild builds the image of a static test binary and reads it back: the
// config is the Dockerfile's (entrypoint, user, port), the one layer holds
// the binary byte for byte at /memprof (0755) and /tmp (1777), the digest is
// the same for the same binary, the docker-archive round-trips, and a
// dynamically linked binary is refused.
func TestBuild(t *testing.T) {
	bin := testprog.Build(t, "k8s_pause.c", "-static")
	img, err := Build(bin)
	if err != nil {
		t.Fatal(err)
	}
	again, err := Build(bin)
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("same binary, digests %s and %s: the image is not reproducible", d1, d2)
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	// the Dockerfile's final stage says the same
	df, err := os.ReadFile(filepath.Join(testprog.Root(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var dEntry []string
	var dUser, dPort string
	for _, line := range strings.Split(string(df), "\n") {
		if rest, ok := strings.CutPrefix(line, "ENTRYPOINT "); ok {
			json.Unmarshal([]byte(rest), &dEntry)
		}
		if rest, ok := strings.CutPrefix(line, "USER "); ok {
			dUser = strings.TrimSpace(rest)
		}
		if rest, ok := strings.CutPrefix(line, "EXPOSE "); ok {
			dPort = strings.TrimSpace(rest) + "/tcp"
		}
	}
	if !slices.Equal(cf.Config.Entrypoint, dEntry) || cf.Config.User != dUser {
		t.Errorf("entrypoint %q user %q, the Dockerfile's %q %q", cf.Config.Entrypoint, cf.Config.User, dEntry, dUser)
	}
	if _, ok := cf.Config.ExposedPorts[dPort]; !ok || len(cf.Config.ExposedPorts) != 1 {
		t.Errorf("exposed ports %v, the Dockerfile's %s", cf.Config.ExposedPorts, dPort)
	}

	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d, %v; want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	want, _ := os.ReadFile(bin)
	tr := tar.NewReader(rc)
	seen := map[string]int64{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		seen[h.Name] = h.Mode
		if h.Name == "memprof" {
			got, _ := io.ReadAll(tr)
			if !bytes.Equal(got, want) {
				t.Errorf("/memprof in the layer differs from the binary (%d vs %d bytes)", len(got), len(want))
			}
		}
	}
	if seen["memprof"] != 0o755 || seen["tmp/"] != 0o1777 || len(seen) != 2 {
		t.Errorf("layer files (name: mode) %v, want memprof 0755 and tmp/ 1777 only", seen)
	}

	out := filepath.Join(t.TempDir(), "img.tar")
	if err := Write(out, "memprof:latest", img); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag("memprof:latest")
	back, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatalf("read the archive back: %v", err)
	}
	if d, _ := back.Digest(); d != d1 {
		t.Errorf("archive holds %s, built %s", d, d1)
	}

	dyn := testprog.Build(t, "k8s_pause.c")
	if _, err := Build(dyn); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("a dynamically linked binary: %v, want an error naming CGO_ENABLED=0", err)
	}
	if err := Write(out, "Not A Tag!", img); err == nil {
		t.Error("Write accepted an invalid tag")
	}
}
