# memprof build, test and benchmark entry points. Everything runs as root on
# a Linux host with BTF (see README.md).

GO        ?= go
BIN       := bin/memprof
APT_PKGS  := clang llvm libbpf-dev bpftool gcc g++ libc6-dev libc6-dbg binutils \
             libjemalloc2 libjemalloc-dev redis-server redis-tools runc containerd \
             prometheus util-linux mount chromium libtcmalloc-minimal4 libgoogle-perftools4 \
             libmimalloc2.0 musl-tools librust-jemalloc-sys-dev \
             default-jdk-headless python3 python3-dbg rustc clang-format
DEMO_DIR  := bin/demo

.PHONY: all build generate check-generated vmlinux deps test test-unit test-root lint bench bench-agent fuzz demo report-assets clean image

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
	$(GO) generate ./bpf/...

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

# The whole suite, in the order CI runs it: lint, the fast unit tier, the
# root tier (real BPF, uprobes, cgroups, OOM kills; -p 1: OOM kills and
# timing tests of one package must not land in another's).
test: lint test-unit test-root

# Tests that need neither root nor BPF (-short skips the root tier), with
# the race detector.
test-unit:
	$(GO) test -short -race -count=1 ./...

test-root:
	$(GO) vet ./...
	$(GO) test -count=1 -p 1 -timeout 45m ./...

# golangci-lint v2 (.golangci.yml; pinned in internal/tools/go.mod) and
# clang-format (.clang-format) for the BPF C sources.
LINT := bin/golangci-lint
BPF_C := $(filter-out bpf/vmlinux.h,$(wildcard bpf/*.c bpf/*.h))
lint:
	cd internal/tools && $(GO) build -o ../../$(LINT) github.com/golangci/golangci-lint/v2/cmd/golangci-lint
	$(LINT) run ./...
	clang-format --dry-run --Werror $(BPF_C)

# Fuzz the readers of a target's files (ELF objects and symbols, DWARF line
# tables, build-ID notes, CFI and its expressions, probe sites), each for
# FUZZTIME, from the seed corpora in each package's testdata/fuzz/. New
# coverage inputs are not minimized (that stalls on large ELF seeds).
FUZZTIME ?= 30s
FUZZ_TARGETS := internal/symbolize:FuzzLoadObject internal/symbolize:FuzzDWARFLines \
                internal/symbolize:FuzzLineHeader internal/symbolize:FuzzNotes \
                internal/unwind:FuzzCFI internal/unwind:FuzzEval internal/unwind:FuzzNoteBuildID \
                internal/unwind:FuzzParseTable internal/attach:FuzzFindSites \
                internal/report:FuzzSeriesReport internal/report:FuzzProfileReport
# A target that fails without writing a failing input is run again, up to
# three times in all: Go's fuzzing coordinator (before Go 1.27, go.dev/issue/75804)
# can report "context deadline exceeded" at the -fuzztime deadline when its
# parent context is cancelled before the workers' (no finding; a real crash
# always writes its input to testdata/fuzz first).
fuzz:
	@for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t##*:}; \
		for try in 1 2 3; do \
			echo "fuzz $$fn ($$pkg) for $(FUZZTIME)"; \
			out=$$($(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 1x ./$$pkg 2>&1); rc=$$?; echo "$$out"; \
			if [ $$rc -eq 0 ]; then break; fi; \
			if echo "$$out" | grep -q 'Failing input written'; then exit 1; fi; \
			if [ $$try -eq 3 ]; then exit 1; fi; \
			echo "fuzz $$fn: failed without a failing input (the coordinator's deadline race, go.dev/issue/75804): once more"; \
		done; \
	done

# ns per malloc+free pair: no probes, empty probes (floor), entry-site probes,
# memprof at the default rate and at rate 1, glibc and jemalloc, side by side.
bench:
	$(GO) test -count=1 -run '^$$' -bench . -benchtime=1x -timeout 30m ./internal/bench/
	$(GO) test -count=1 -run '^$$' -bench BPFWalk -benchtime=1000x ./internal/unwindtable/
	$(GO) test -count=1 -run '^$$' -bench 'TableBuild|LiveProbe' -benchtime=1x ./internal/unwindtable/
	$(GO) test -count=1 -run '^$$' -bench RSSProgramCost -benchtime=1x ./internal/rss/
	$(GO) test -count=1 -run '^$$' -bench ForkFlood -benchtime=1x ./internal/procwatch/

# The node agent's own CPU (% of a core), RSS and time to profile a new
# container, with 25, 100 and 200 kubelet-style pods (internal/bench/agentbench).
bench-agent:
	$(GO) test -count=1 -run '^$$' -bench Agent -benchtime=1x -timeout 30m ./internal/bench/agentbench/

# Build memprof and a leaky example, record it, print the top stacks and what
# grew, and write the HTML report (bin/demo/report.html).
demo: build
	@mkdir -p $(DEMO_DIR)
	gcc -g -O1 -fno-omit-frame-pointer -pthread -o $(DEMO_DIR)/leaky testdata/demo_server.c
	./$(BIN) record -o $(DEMO_DIR)/heap.pb.gz -- ./$(DEMO_DIR)/leaky
	@echo
	./$(BIN) report --top 5 --html $(DEMO_DIR)/report.html $(DEMO_DIR)/heap.pb.gz

# Refresh the flame-graph and chart libraries bundled into `memprof report
# --html` (internal/report/assets, embedded with go:embed) from npm; bump the
# versions here, run it, and commit the result.
D3_VERSION         := 7.9.2
D3_FLAMEGRAPH_VERSION := 5.0.0
REPORT_ASSETS      := internal/report/assets
report-assets:
	@tmp=$$(mktemp -d) && cd $$tmp && \
	npm pack --silent d3@$(D3_VERSION) d3-flame-graph@$(D3_FLAMEGRAPH_VERSION) >/dev/null && \
	mkdir d3 fg && tar xzf d3-$(D3_VERSION).tgz -C d3 && tar xzf d3-flame-graph-$(D3_FLAMEGRAPH_VERSION).tgz -C fg && \
	cd $(CURDIR) && \
	cp $$tmp/d3/package/dist/d3.min.js $(REPORT_ASSETS)/ && \
	cp $$tmp/d3/package/LICENSE $(REPORT_ASSETS)/LICENSE.d3 && \
	cp $$tmp/fg/package/dist/d3-flamegraph.umd.min.js $$tmp/fg/package/dist/d3-flamegraph.css $(REPORT_ASSETS)/ && \
	cp $$tmp/fg/package/LICENSE $(REPORT_ASSETS)/LICENSE.d3-flame-graph && \
	printf 'd3 $(D3_VERSION) (npm, ISC licence: LICENSE.d3)\nd3-flame-graph $(D3_FLAMEGRAPH_VERSION) (npm, Apache-2.0: LICENSE.d3-flame-graph)\nRefresh with: make report-assets\n' > $(REPORT_ASSETS)/VERSIONS && \
	rm -rf $$tmp && echo "$(REPORT_ASSETS) refreshed: d3 $(D3_VERSION), d3-flame-graph $(D3_FLAMEGRAPH_VERSION)"

clean:
	rm -rf bin
