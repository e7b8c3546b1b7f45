# syntax=docker/dockerfile:1
# memprof image: docker build -t memprof:latest .
#
# The BPF objects are compiled by `go generate` (bpf2go, clang) and committed
# as Go-embedded files, so this build needs no clang: only the Go toolchain.

FROM golang:1.26 AS build
WORKDIR /src
# module downloads are cached in their own layer
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# static binary: the final stage has no libc
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -o /out/memprof ./cmd/memprof

# distroless static: CA certificates, tzdata, /etc/passwd, no shell. The agent
# runs as root inside the container (uid 0) so that the capabilities the
# DaemonSet adds are effective; it is not privileged.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/memprof /memprof
USER 0:0
EXPOSE 9464
ENTRYPOINT ["/memprof"]
