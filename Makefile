# memprof build, test and benchmark entry points. Everything runs as root on
# a Linux host with BTF (see README.md).

GO        ?= go
BIN       := bin/memprof
APT_PKGS  := clang llvm libbpf-dev bpftool gcc g++ libc6-dev libc6-dbg binutils \
             libjemalloc2 libjemalloc-dev redis-server redis-tools runc containerd \
             prometheus util-linux mount
DEMO_DIR  := bin/demo

.PHONY: all build generate check-generated vmlinux deps test bench bench-agent demo clean image

all: build

build:
	$(GO) build -o $(BIN) ./cmd/memprof

# The agent's container image without Docker or a base image: the static
# binary on an empty base (internal/image), as a docker-archive tarball for
# `ctr -n k8s.io images import` or `docker load -i`. deploy/'s containerd test
# runs this image with the DaemonSet's security context.
image:
	@mkdir -p bin
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/memprof-static ./cmd/memprof
	$(GO) run ./cmd/memprof-image -binary bin/memprof-static -o bin/memprof-image.tar -tag memprof:latest

# Rebuild the BPF object and its Go loader from bpf/memprof.bpf.c (needs clang).
generate:
	$(GO) generate ./bpf/

# CI: the committed bpf2go output must match the sources.
check-generated: generate
	@git diff --exit-code --stat -- bpf/ || { echo "bpf/: generated files are stale: run 'make generate' and commit"; exit 1; }

# Regenerate bpf/vmlinux.h from the running kernel's BTF (CO-RE makes the
# result portable; only needed to use newer kernel types).
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/vmlinux.h

# Install what building, testing and the demo need (Debian, as root).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# kubectl (for the deploy/ kustomize test) ships with this kind of machine;
	@# elsewhere Debian's kubernetes-client provides it.
	@command -v kubectl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null

test:
	$(GO) vet ./...
	$(GO) test -count=1 -p 1 -timeout 30m ./...

# ns per malloc+free pair: no probes, empty probes (floor), entry-site probes,
# memprof at the default rate and at rate 1, glibc and jemalloc, side by side.
bench:
	$(GO) test -count=1 -run '^$$' -bench . -benchtime=1x -timeout 30m ./internal/bench/

# The node agent's own CPU (% of a core), RSS and time to profile a new
# container, with 25, 100 and 200 kubelet-style pods (internal/bench/agentbench).
bench-agent:
	$(GO) test -count=1 -run '^$$' -bench Agent -benchtime=1x -timeout 30m ./internal/bench/agentbench/

# Build memprof and a leaky example, record it, print the top stacks.
demo: build
	@mkdir -p $(DEMO_DIR)
	gcc -g -O1 -fno-omit-frame-pointer -pthread -o $(DEMO_DIR)/leaky testdata/demo_server.c
	./$(BIN) record -o $(DEMO_DIR)/heap.pb.gz -- ./$(DEMO_DIR)/leaky
	@echo
	./$(BIN) report --top 5 $(DEMO_DIR)/heap.pb.gz

clean:
	rm -rf bin
