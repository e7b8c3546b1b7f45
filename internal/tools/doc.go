// Package tools pins the developer tools memprof's Makefile runs (see go.mod
// here: golangci-lint v2, run by `make lint`). It is a module of its own so
// the tools' dependencies stay out of memprof's go.mod and image build.
package tools
