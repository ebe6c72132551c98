# sluice: the two commands a newcomer needs are `make run` and `make test`.
# Both install what they need on a fresh Debian machine first.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# cmake: pingora's zlib-ng build. prometheus: promtool, which checks /metrics in the tests.
# The database servers: the role-aware health checks are tested against real ones
# (started by the tests on loopback ports, never as system services).
# The TLS peers: curl, openssl s_client, redis-cli --tls and NGINX as an HTTPS
# backend (run by the tests in the foreground, never as a service).
DEB_PACKAGES := cmake prometheus mariadb-server mariadb-client redis-server redis-tools postgresql \
	curl openssl nginx-light
# The peers and load generators `make bench` runs side by side with sluice.
BENCH_PACKAGES := haproxy nginx-light libnginx-mod-stream iperf3 redis-server redis-tools

.PHONY: help deps bench-deps build release run test fuzz bench soak lint check-config docker-build docker-up docker-down clean

help:
	@echo "make run      start the demo: sluice + three demo backends on 127.0.0.1"
	@echo "make test     lint and run every test (unit + integration over real sockets)"
	@echo "make fuzz     the health-check fuzz targets at length (FUZZ_CASES per target, default 3000; a few minutes)"
	@echo "make bench    sluice vs HAProxy vs NGINX stream on loopback; writes bench/RESULTS.md (~15 min)"
	@echo "make soak     minutes of load with churn, reloads and restarts; RSS and fds must stay flat (SOAK_SECS, default 300)"
	@echo "make release  build target/release/sluice"
	@echo "make deps     install the Debian packages the build and tests need"

# Install the Debian packages named in $(1) that are missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PACKAGES))

bench-deps:
	$(call apt_install,$(BENCH_PACKAGES))

build: deps
	$(CARGO) build --locked --bin sluice --example demo_backend

release: deps
	$(CARGO) build --locked --release --bin sluice

run: build
	./scripts/demo.sh

test: deps lint
	$(CARGO) test --locked

# The health-check fuzz targets (tests/check_fuzz.rs), with many more cases
# than the 40 per target that `make test` runs. An unoptimized build on
# purpose: it keeps overflow checks on.
FUZZ_CASES ?= 3000
fuzz:
	SLUICE_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --locked --test check_fuzz -- --nocapture

bench: deps bench-deps release
	python3 bench/bench.py

# Not part of `make test`: it runs for SOAK_SECS seconds (default 300, at most 600).
soak: deps
	$(CARGO) test --locked --release --test soak -- --ignored --nocapture

lint:
	@if $(CARGO) fmt --version >/dev/null 2>&1; then $(CARGO) fmt --check; \
	else echo "WARNING: rustfmt is not installed; skipping the format check"; fi
	@if $(CARGO) clippy --version >/dev/null 2>&1; then $(CARGO) clippy --locked --all-targets -- -D warnings; \
	else echo "WARNING: clippy is not installed; skipping lints"; fi

# Files with TLS are checked against test certificates made for the purpose.
check-config: build
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; ./scripts/demo-certs.sh "$$tmp/tls" >/dev/null; \
	for f in conf/*.yaml; do g=$$f; if grep -q /etc/sluice/tls $$f; then \
	g="$$tmp/$$(basename $$f)"; sed "s|/etc/sluice/tls|$$tmp/tls|g" $$f > "$$g"; fi; \
	SLUICE_MYSQL_MONITOR_PASSWORD=x ./target/debug/sluice -t -c "$$g" >/dev/null && echo "ok  $$f" || exit 1; done

docker-build:
	docker build -f docker/Dockerfile -t sluice:latest .

docker-up:
	docker compose -f docker/docker-compose.yml up --build

docker-down:
	docker compose -f docker/docker-compose.yml down

clean:
	$(CARGO) clean
