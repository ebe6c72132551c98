# rust:1.95-bookworm, made locally for machines without a registry
# (scripts/docker-base-images.sh --rust builds it, with this machine's Rust
# toolchain in the build context; elsewhere, pull the real one). Laid out
# like the official image: CARGO_HOME=/usr/local/cargo, cargo on the PATH.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      ca-certificates gcc g++ libc6-dev make cmake pkg-config git binutils >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain/ /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=1.95.0
RUN mkdir -p /usr/local/cargo/bin && chmod 1777 /usr/local/cargo && cargo --version && rustc --version
LABEL org.opencontainers.image.description="made locally by scripts/docker-base-images.sh --rust"
