#!/usr/bin/env bash
# Make the base images that docker/ builds FROM, locally and from Debian's
# packages, for machines that cannot pull from a registry. Each image gets
# the name the Dockerfiles use, so the same Dockerfiles build here and
# anywhere else. An image that already exists is kept as it is (remove it to
# make it anew). Where a registry is reachable none of this is needed:
#   docker pull debian:bookworm-slim
#   docker pull gcr.io/distroless/cc-debian12:nonroot
#   docker pull rust:1.95-bookworm          # only for the from-source build
#
# Usage: scripts/docker-base-images.sh [--rust]
#   debian:bookworm-slim                 debootstrap --variant=minbase, trimmed like Debian's slim image
#   gcr.io/distroless/cc-debian12:nonroot  the Debian packages distroless "cc" is made of
#                                          (glibc, libgcc, libstdc++, libgomp, libssl, CA
#                                          certificates, tzdata), unpacked; user nonroot (65532)
#   --rust: rust:1.95-bookworm           Debian's C toolchain and cmake, plus this machine's
#                                          Rust 1.95 toolchain (no Debian package has 1.95)
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

cd "$(dirname "$0")/.."
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_IMAGE=debian:bookworm-slim
RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
RUST_IMAGE=rust:1.95-bookworm
RUST_VERSION=1.95.0
LABEL='org.opencontainers.image.description="made locally by scripts/docker-base-images.sh"'

want_rust=false
for arg in "$@"; do
	case $arg in
	--rust) want_rust=true ;;
	*) echo "usage: $0 [--rust]" >&2; exit 2 ;;
	esac
done

have() { docker image inspect "$1" >/dev/null 2>&1; }
say() { echo "base images: $*"; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/sluice-base.XXXXXX")
trap 'rm -rf "$work"' EXIT

make_debian() {
	if ! command -v debootstrap >/dev/null; then
		say "installing debootstrap"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
	fi
	local root=$work/rootfs
	say "debootstrap bookworm from $MIRROR (about a minute)"
	debootstrap --variant=minbase --components=main bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
		tail -20 "$work/debootstrap.log" >&2
		exit 1
	}
	# What Debian's own slim image does: no documentation, manuals or
	# translations now or from later installs; apt keeps no caches.
	cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<-'CFG'
		path-exclude /usr/share/doc/*
		path-include /usr/share/doc/*/copyright
		path-exclude /usr/share/man/*
		path-exclude /usr/share/groff/*
		path-exclude /usr/share/info/*
		path-exclude /usr/share/lintian/*
		path-exclude /usr/share/linda/*
		path-exclude /usr/share/locale/*
	CFG
	cat >"$root/etc/apt/apt.conf.d/docker-clean" <<-'CFG'
		DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
		APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
		Dir::Cache::pkgcache "";
		Dir::Cache::srcpkgcache "";
	CFG
	echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
	echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
	rm -f "$root/etc/apt/sources.list"
	cat >"$root/etc/apt/sources.list.d/debian.sources" <<-CFG
		Types: deb
		URIs: $MIRROR
		Suites: bookworm bookworm-updates
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

		Types: deb
		URIs: ${MIRROR%/debian}/debian-security
		Suites: bookworm-security
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	CFG
	find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
	find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
	rm -rf "$root"/usr/share/{man,info,groff,lintian,linda,locale}/* \
		"$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* \
		"$root"/tmp/* "$root"/var/tmp/*
	# Docker writes these at run time.
	: >"$root/etc/resolv.conf"
	: >"$root/etc/hostname"
	say "importing $DEBIAN_IMAGE"
	tar --numeric-owner -C "$root" -c . | docker import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'CMD ["bash"]' \
		--change "LABEL $LABEL" \
		- "$DEBIAN_IMAGE" >/dev/null
	rm -rf "$root"
}

if have "$DEBIAN_IMAGE"; then say "$DEBIAN_IMAGE exists; kept"; else make_debian; fi

if have "$RUNTIME_IMAGE"; then
	say "$RUNTIME_IMAGE exists; kept"
else
	say "building $RUNTIME_IMAGE from Debian packages"
	docker build -q -t "$RUNTIME_IMAGE" -f docker/base/distroless-cc.Dockerfile docker/base >/dev/null
	docker image prune -f --filter label=org.sluice.stage=base-unpack >/dev/null
fi

if $want_rust; then
	if have "$RUST_IMAGE"; then
		say "$RUST_IMAGE exists; kept"
	else
		sysroot=$(rustc +"$RUST_VERSION" --print sysroot 2>/dev/null || rustc --print sysroot)
		version=$("$sysroot/bin/rustc" --version)
		case $version in
		"rustc $RUST_VERSION "*) ;;
		*) echo "base images: $RUST_IMAGE needs Rust $RUST_VERSION; this machine has: $version" >&2; exit 1 ;;
		esac
		say "building $RUST_IMAGE with $version from $sysroot"
		mkdir -p "$work/rust/toolchain/lib/rustlib"
		# The compiler, cargo and the standard library; no docs or sources.
		cp -a "$sysroot/bin" "$work/rust/toolchain/"
		cp -a "$sysroot"/lib/*.so "$work/rust/toolchain/lib/"
		cp -a "$sysroot/lib/rustlib/x86_64-unknown-linux-gnu" "$work/rust/toolchain/lib/rustlib/"
		cp docker/base/rust.Dockerfile "$work/rust/Dockerfile"
		docker build -q -t "$RUST_IMAGE" "$work/rust" >/dev/null
	fi
fi
say "ready: $(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^($DEBIAN_IMAGE|$RUNTIME_IMAGE|$RUST_IMAGE) " | tr '\n' ';')"
