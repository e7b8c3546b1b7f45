// Command memprof-image writes memprof's container image as a docker-archive
// tarball from a static memprof binary, without Docker or a base image
// (internal/image). `make image` runs it:
//
//	CGO_ENABLED=0 go build -trimpath -o bin/memprof-static ./cmd/memprof
//	go run ./cmd/memprof-image -binary bin/memprof-static -o bin/memprof-image.tar
//	ctr -n k8s.io images import bin/memprof-image.tar   # or docker load -i
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/memprof/memprof/internal/image"
)

func main() {
	bin := flag.String("binary", "bin/memprof-static", "static memprof binary (CGO_ENABLED=0 go build ./cmd/memprof)")
	out := flag.String("o", "bin/memprof-image.tar", "docker-archive tarball to write")
	tag := flag.String("tag", "memprof:latest", "image name and tag (deploy/daemonset.yaml runs memprof:latest)")
	flag.Parse()
	img, err := image.Build(*bin)
	if err == nil {
		err = image.Write(*out, *tag, img)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "memprof-image:", err)
		os.Exit(1)
	}
	d, _ := img.Digest()
	fmt.Printf("wrote %s: %s (%s)\n", *out, *tag, d)
}
