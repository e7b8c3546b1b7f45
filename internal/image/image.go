// Package image assembles memprof's OCI container image without a container
// engine or a base image: one layer holding the static memprof binary at
// /memprof and an empty /tmp, on an empty (scratch) base, with the
// Dockerfile's entrypoint, user and port. It uses go-containerregistry and
// writes a docker-archive tarball, which `ctr images import`, `docker load`
// and `podman load` read. This is the image the containerd test of
// deploy/ runs with the DaemonSet's security context; the Dockerfile (a
// distroless base, built by Docker) remains for users.
package image

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Port is the port the image declares (the agent's --listen port in
// deploy/daemonset.yaml).
const Port = "9464/tcp"

// Build returns the image of the static binary at path, for linux and the
// binary's architecture (amd64 or arm64). The binary must be statically
// linked (CGO_ENABLED=0 go build): the image has no libc and no dynamic
// loader. File times are the Unix epoch, so the same binary gives the same
// image digest.
func Build(path string) (v1.Image, error) {
	bin, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	arch, err := staticArch(path)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	hdrs := []struct {
		h    tar.Header
		data []byte
	}{
		{tar.Header{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: epoch}, nil},
		{tar.Header{Name: "memprof", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin)), ModTime: epoch}, bin},
	}
	for _, e := range hdrs {
		if err := tw.WriteHeader(&e.h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("image layer: %w", err)
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: arch,
		OS:           "linux",
		Config: v1.Config{
			Entrypoint:   []string{"/memprof"},
			User:         "0:0",
			ExposedPorts: map[string]struct{}{Port: {}},
			Env:          []string{"PATH=/"},
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, err
	}
	return mutate.AppendLayers(img, layer)
}

// staticArch checks that path is a statically linked Linux ELF executable
// and returns its architecture as OCI names it.
func staticArch(path string) (string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w (want the static memprof binary)", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("%s is dynamically linked: build it with CGO_ENABLED=0 (the image has no libc)", path)
		}
	}
	switch f.Machine {
	case elf.EM_X86_64:
		return "amd64", nil
	case elf.EM_AARCH64:
		return "arm64", nil
	}
	return "", fmt.Errorf("%s: unsupported machine %v (memprof's BPF objects are built for amd64 and arm64)", path, f.Machine)
}

// Write writes img to out as a docker-archive tarball tagged ref (for
// example "memprof:latest", which the importers name
// docker.io/library/memprof:latest).
func Write(out, ref string, img v1.Image) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("image tag %q: %w", ref, err)
	}
	if err := tarball.WriteToFile(out, tag, img); err != nil {
		return fmt.Errorf("write image %s: %w", out, err)
	}
	return nil
}
