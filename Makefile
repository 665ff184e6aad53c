# Aegis Streams. `make run` builds and starts Caddyfile.example; `make test`
# runs every test. See README.md.

GO      ?= go
BIN     := bin/aegis
XCADDY  ?= $(shell $(GO) env GOPATH)/bin/xcaddy
FUZZTIME ?= 60s

.PHONY: all build run test test-needs vet cross fmt fuzz bench bench-cluster soak e2e postgres xcaddy clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/aegis

run: build
	$(BIN) run --config Caddyfile.example --adapter caddyfile

vet:
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# The module builds where Caddy runs, not only on Linux: FreeBSD, macOS and
# Windows (with the internal/ packages the modules import; cmd/aegis-bench
# and the test helper internal/pgserver are Linux-only).
cross:
	GOOS=freebsd $(GO) build . ./modules/... ./admin/... ./storage/...
	GOOS=darwin $(GO) build . ./modules/... ./admin/... ./storage/...
	GOOS=windows $(GO) build . ./modules/... ./admin/... ./storage/...

# First a check of what it needs (test-needs), vet, the builds for other
# systems (cross), and the web UI's tests in a browser (e2e); then the
# allocation checks, which need a build without the race detector, then
# every test with it (fuzz targets run their committed seeds; the tests
# that run aegis as a command run bin/aegis).
test: test-needs postgres vet cross build e2e
	$(GO) test -count=1 -run 'NotAllocate' ./internal/logpace ./modules/l4aegisproxy ./modules/udpnat
	AEGIS_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 ./...
	@# validate opens the storage it names (and migrates it): a throwaway
	@# home, not the SQLite database of make run under ~/.local/share/caddy.
	tmp=$$(mktemp -d) && XDG_DATA_HOME=$$tmp XDG_CONFIG_HOME=$$tmp $(BIN) validate --config Caddyfile.example --adapter caddyfile; \
		rc=$$?; rm -rf "$$tmp"; exit $$rc

# What make test needs besides Go and make, said in one line before any of
# it runs: a C compiler (the race detector uses cgo), Node.js 20 or later
# with npm (the UI's tests), and, when chromium is not installed yet,
# apt-get and root or sudo to install it (and postgresql). npm ci and apt-get also need the
# network, which is not checked here.
test-needs:
	@missing=""; \
	command -v "$$($(GO) env CC)" >/dev/null || missing="$$missing, $$($(GO) env CC) (the race detector needs a C compiler)"; \
	node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null || missing="$$missing, Node.js 20 or later"; \
	command -v npm >/dev/null || missing="$$missing, npm"; \
	if [ ! -x /usr/bin/chromium ] || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		command -v apt-get >/dev/null || missing="$$missing, apt-get (to install chromium and postgresql)"; \
		[ "$$(id -u)" = 0 ] || command -v sudo >/dev/null || missing="$$missing, root or sudo (to apt-get install chromium and postgresql)"; \
	fi; \
	if [ -n "$$missing" ]; then echo "make test needs$${missing#,}; install them and run it again (README.md, Set-up)"; exit 1; fi

# Each fuzz target of each package for $(FUZZTIME); the first failure (a
# crash, a broken invariant, a package that does not build) stops it.
fuzz:
	@pkgs=$$($(GO) list ./...) || exit 1; \
	for pkg in $$pkgs; do \
		list=$$($(GO) test -list '^Fuzz' $$pkg) || { echo "$$list"; exit 1; }; \
		for target in $$(echo "$$list" | grep '^Fuzz'); do \
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

# Three bin/aegis nodes on one PostgreSQL that the bench starts (Debian's
# postgresql, installed when missing), and one on SQLite: propagation of
# edits, API writes per second, catch-up (aegis-bench -cluster).
bench-cluster: build postgres
	$(GO) build -o bin/aegis-bench ./cmd/aegis-bench
	bin/aegis-bench -aegis $(BIN) -cluster

# A soak of bin/aegis for $(SOAK_TIME) (aegis-bench -soak): TCP, UDP and TLS
# clients and an API change every second, then the leak and accounting
# checks; a summary table on stdout, exit status 1 if a check fails.
SOAK_TIME ?= 10m

soak: build
	$(GO) build -o bin/aegis-bench ./cmd/aegis-bench
	bin/aegis-bench -aegis $(BIN) -soak $(SOAK_TIME)

# The tests that need a database server run their own PostgreSQL from
# Debian's package (internal/pgtest); install it when it is missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
		echo "installing: postgresql"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql || exit 1; \
	}

# The web UI's unit tests (ui/test), then its browser tests (ui/e2e/run.mjs):
# Debian's headless Chromium drives the UI of a real bin/aegis on loopback;
# screenshots go to test-artifacts/ui/. Installs chromium with apt-get and
# the tests' npm packages (npm ci) when they are missing. One test runs
# two nodes on a PostgreSQL of its own (postgresql, installed by make
# postgres).
e2e: build postgres
	@command -v node >/dev/null && command -v npm >/dev/null || { echo "make e2e needs Node.js 20 or later, with npm"; exit 1; }
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing: chromium"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || exit 1; \
	fi
	@test -d ui/e2e/node_modules/playwright-core -a -d ui/e2e/node_modules/axe-core || (cd ui/e2e && npm ci --no-audit --no-fund)
	node --test ui/test/
	AEGIS_BIN=$(CURDIR)/$(BIN) node ui/e2e/run.mjs

# The same binary, built by xcaddy from what xcaddy.json pins (one
# "with" per line: module@version, or module=path for this checkout).
xcaddy:
	@test -x $(XCADDY) || $(GO) install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
	$(XCADDY) build $$(sed -n 's/.*"caddy_version": *"\([^"]*\)".*/\1/p' xcaddy.json) \
		--output $(BIN) \
		$$(sed -n 's/.*"with": *"\([^"]*\)".*/--with \1/p' xcaddy.json)

clean:
	rm -rf bin
