# wanmotion — see README.md. `make demo` and `make test` are the two commands.
GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
TEST_TIMEOUT ?= 45m

.PHONY: all build test vet fmt-check demo bench clean tidy-check

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/...

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
