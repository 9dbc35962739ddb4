# spanpull: lazy-pulled containers from unmodified gzip OCI images.
SHELL := /bin/bash
GO ?= go
GOBIN ?= $(shell $(GO) env GOPATH)/bin
export PATH := $(GOBIN):$(PATH)
export CGO_ENABLED := 1
BIN := bin
# The benchmark harness is a module of its own (its charts need gonum).
BENCH_MOD := integration/bench
# The whole suite must stay well under CI's budget on 2 cores.
TEST_TIMEOUT ?= 25m

.PHONY: all build deps test lint unit fuzz bench demo clean

all: build

build:
	$(GO) build -o $(BIN)/indexer ./cmd/indexer
	$(GO) build -o $(BIN)/snapshotter ./cmd/snapshotter

deps:
	@scripts/install-deps.sh

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	staticcheck ./...
	cd $(BENCH_MOD) && $(GO) vet ./... && staticcheck ./...

# make test: everything CI runs. Installs its own prerequisites first.
test: deps lint build
	$(GO) test -race -timeout $(TEST_TIMEOUT) -count=1 ./...
	cd $(BENCH_MOD) && $(GO) test -race -count=1 ./...

# Short fuzzing sessions of every parser (seed corpora live in testdata/).
FUZZTIME ?= 30s
fuzz:
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzUnmarshal$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzUnmarshalGzipZinfo$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzBuild$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzCheckHeader$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzVerifyLayer$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./ztoc -run '^$$' -fuzz '^FuzzInflateStream$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./index -run '^$$' -fuzz '^FuzzParseIndex$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./index -run '^$$' -fuzz '^FuzzParseImage$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./fusefs -run '^$$' -fuzz '^FuzzNewRoot$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s

bench: deps build
	scripts/bench.sh

demo: deps build
	scripts/demo.sh

clean:
	rm -rf $(BIN)
