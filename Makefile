# Aegis Streams. `make run` builds and starts Caddyfile.example; `make test`
# runs every test. See README.md.

GO      ?= go
BIN     := bin/aegis
XCADDY  ?= $(shell $(GO) env GOPATH)/bin/xcaddy
FUZZTIME ?= 60s

.PHONY: all build run test vet fmt fuzz bench xcaddy clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/aegis

run: build
	$(BIN) run --config Caddyfile.example --adapter caddyfile

vet:
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# The allocation checks, which need a build without the race detector, then
# every test with it (fuzz targets run their committed seeds).
test: vet build
	$(GO) test -count=1 -run 'NotAllocate' ./modules/l4aegisproxy ./modules/udpnat
	$(GO) test -race -count=1 ./...
	$(BIN) validate --config Caddyfile.example --adapter caddyfile

# Each fuzz target of each package for $(FUZZTIME).
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for target in $$($(GO) test -list '^Fuzz' $$pkg | grep ^Fuzz); do \
			echo "== $$pkg $$target"; \
			$(GO) test -run '^$$' -fuzz "^$$target$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$pkg || exit 1; \
		done; \
	done

# Aegis against HAProxy, nginx and no proxy on loopback (cmd/aegis-bench).
# Flags go in BENCH_FLAGS, e.g. BENCH_FLAGS='-only aegis,haproxy -duration 2s'.
BENCH_FLAGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

bench: build
	$(GO) build -o bin/aegis-bench ./cmd/aegis-bench
	@pkgs=""; \
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || pkgs="$$pkgs haproxy"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || pkgs="$$pkgs nginx"; \
	test -f /usr/lib/nginx/modules/ngx_stream_module.so || pkgs="$$pkgs libnginx-mod-stream"; \
	if [ -n "$$pkgs" ]; then \
		echo "installing:$$pkgs"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y$$pkgs || exit 1; \
	fi
	bin/aegis-bench -aegis $(BIN) $(BENCH_FLAGS)

# The same binary, built by xcaddy from what xcaddy.json pins (one
# "with" per line: module@version, or module=path for this checkout).
xcaddy:
	@test -x $(XCADDY) || $(GO) install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
	$(XCADDY) build $$(sed -n 's/.*"caddy_version": *"\([^"]*\)".*/\1/p' xcaddy.json) \
		--output $(BIN) \
		$$(sed -n 's/.*"with": *"\([^"]*\)".*/--with \1/p' xcaddy.json)

clean:
	rm -rf bin
