# wanmotion — see README.md. `make demo` and `make test` are the two commands.
GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
TEST_TIMEOUT ?= 45m
# Backend binaries (wanmotion-storage-*, wanmotion-network-*), built next to wanmotion so it finds them.
BACKENDS  := $(shell ls -d ./storage-backends/*/cmd/* ./network-backends/*/cmd/* 2>/dev/null)

.PHONY: all build test vet fmt-check demo bench clean tidy-check

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/... $(BACKENDS)

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Everything: formatting, vet, unit + interop + conformance + end-to-end tests, race detector on.
test: fmt-check vet build
	$(GO) test -race -timeout $(TEST_TIMEOUT) ./...

demo: build
	./$(BIN)/wanmotion demo

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./...

tidy-check:
	$(GO) mod tidy && git diff --exit-code go.mod go.sum

clean:
	rm -rf $(BIN)

.PHONY: install dist

# Install layout (packaging/install.sh): binary, backends, host plugin link,
# hooks, default config, XenCenter manifest. DESTDIR=/ (default) installs
# into the running system; use DESTDIR=$(mktemp -d) to look at it.
install:
	GO=$(GO) VERSION=$(VERSION) packaging/install.sh --build $(BIN) "$(DESTDIR)"

# Release tarball bin/wanmotion-$(VERSION)-linux-amd64.tar.gz (unpack into /).
dist:
	rm -rf $(BIN)/dist
	GO=$(GO) VERSION=$(VERSION) packaging/install.sh --build $(BIN) $(BIN)/dist/root
	tar -C $(BIN)/dist/root -czf $(BIN)/wanmotion-$(VERSION)-linux-amd64.tar.gz --owner=0 --group=0 .
	rm -rf $(BIN)/dist
	@echo $(BIN)/wanmotion-$(VERSION)-linux-amd64.tar.gz
