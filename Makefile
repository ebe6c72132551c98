# sluice: the two commands a newcomer needs are `make run` and `make test`.
# Both install what they need on a fresh Debian machine first.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# cmake: pingora's zlib-ng build. prometheus: promtool, which checks /metrics and the alert
# rules in the tests, and the server that tests/prometheus.rs runs against sluice.
# The database servers: the role-aware health checks are tested against real ones
# (started by the tests on loopback ports, never as system services).
# The TLS peers: curl, openssl s_client, redis-cli --tls and NGINX as an HTTPS
# backend; HAProxy and NGINX (with its stream module) as PROXY protocol peers
# (all run by the tests in the foreground, never as a service).
DEB_PACKAGES := cmake systemd prometheus mariadb-server mariadb-client redis-server redis-tools postgresql \
	curl openssl haproxy nginx-light libnginx-mod-stream
# The peers and load generators `make bench` runs side by side with sluice
# (wrk and h2load, from nghttp2-client, drive the HTTP lines).
BENCH_PACKAGES := haproxy nginx-light libnginx-mod-stream iperf3 redis-server redis-tools wrk nghttp2-client curl openssl

.PHONY: help deps bench-deps build build-bin release run test fuzz bench soak lint check-config base-images image image-from-source up down drills kube-check clean

help:
	@echo "make run      start the demo: sluice + three demo backends on 127.0.0.1"
	@echo "make test     lint and run every test (unit + integration over real sockets)"
	@echo "make fuzz     the health-check fuzz targets at length (FUZZ_CASES per target, default 3000; a few minutes)"
	@echo "make bench    sluice vs HAProxy vs NGINX stream on loopback; writes bench/RESULTS.md (~15 min)"
	@echo "make soak     minutes of load with churn, reloads and restarts; RSS and fds must stay flat (SOAK_SECS, default 300)"
	@echo "make release  build target/release/sluice"
	@echo "make image    build the container image sluice:latest (Docker; base images made locally when missing)"
	@echo "make up       the whole stack in compose: a sluice pair on a floating address, apps, MariaDB, Prometheus"
	@echo "make drills   failure drills against the stack (~5 min), then remove it; make down removes it by hand"
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
	$(MAKE) kube-check
	@if docker info >/dev/null 2>&1; then \
		$(MAKE) drills IMAGE_PROFILE=debug; \
	else \
		echo; \
		echo "################################################################"; \
		echo "##  SKIPPED: the container drills (make drills).              ##"; \
		echo "##  No Docker Engine answers here (docker info failed), so    ##"; \
		echo "##  the image, the compose stack and its failure drills were  ##"; \
		echo "##  NOT tested.                                               ##"; \
		echo "################################################################"; \
		echo; \
	fi

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

# --- containers (README "Container", "High availability") ---------------
# Base images: made from Debian's packages when missing (no registry here);
# where a registry answers, `docker pull` them instead (see the script).
base-images:
	scripts/docker-base-images.sh

# The image from docker/Dockerfile with a binary built here (debug info
# stripped, symbols kept), not a second compile in Docker: the release
# binary, or with IMAGE_PROFILE=debug the one `cargo test` has just built
# (what `make test` uses for the drills: no second compile of the tree).
IMAGE_PROFILE ?= release
ifeq ($(IMAGE_PROFILE),release)
IMAGE_BINARY_TARGET := release
else
IMAGE_BINARY_TARGET := build-bin
endif

build-bin: deps
	$(CARGO) build --locked --bin sluice

image: $(IMAGE_BINARY_TARGET) base-images
	@mkdir -p target/docker
	strip --strip-debug -o target/docker/sluice target/$(IMAGE_PROFILE)/sluice
	docker build -q -f docker/Dockerfile --build-arg BUILDER=debian:bookworm-slim \
		--build-arg PREBUILT=target/docker/sluice -t sluice:latest . >/dev/null
	@docker image prune -f --filter label=org.sluice.stage=builder >/dev/null
	@echo "sluice:latest ($(IMAGE_PROFILE) build): $$(docker image inspect -f '{{.Size}}' sluice:latest | awk '{printf "%.1f MB", $$1/1e6}')"

# The same file as a user elsewhere builds it: compiled inside rust:1.95-bookworm.
image-from-source:
	scripts/docker-base-images.sh --rust
	docker build -f docker/Dockerfile -t sluice:latest .
	@docker image prune -f --filter label=org.sluice.stage=builder >/dev/null

up: image
	python3 scripts/stack.py up

down:
	python3 scripts/stack.py down

# Starts the stack, runs every drill under load, removes the stack.
drills: image
	SLUICE_IMAGE_PROFILE=$(IMAGE_PROFILE) python3 scripts/drills.py

# deploy/kubernetes/ against the Kubernetes schemas (kubernetes-validate from
# PyPI, in a virtualenv under target/) and sluice's own rules; no cluster.
KUBE_VENV := target/kube-venv
$(KUBE_VENV)/bin/kubernetes-validate:
	python3 -m venv $(KUBE_VENV)
	$(KUBE_VENV)/bin/pip install -q 'kubernetes-validate==1.37.0'

kube-check: $(KUBE_VENV)/bin/kubernetes-validate
	$(CARGO) build --locked --bin sluice
	$(KUBE_VENV)/bin/python scripts/check-kubernetes.py target/debug/sluice

clean:
	$(CARGO) clean
