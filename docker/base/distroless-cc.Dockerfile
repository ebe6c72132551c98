# gcr.io/distroless/cc-debian12:nonroot, made from the same Debian packages
# the real one is made of, for machines without a registry
# (scripts/docker-base-images.sh builds it; elsewhere, pull the real one).
# Nothing runs in it but the program copied on top: no shell, no package
# manager, a non-root user.
FROM debian:bookworm-slim AS unpack
# Lets scripts/docker-base-images.sh remove this stage once the image is made.
LABEL org.sluice.stage=base-unpack
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null; \
    mkdir -p /rootfs /debs; cd /debs; \
    apt-get download -qq libc6 libgcc-s1 libstdc++6 libgomp1 libssl3 tzdata netbase; \
    for deb in *.deb; do dpkg-deb -x "$deb" /rootfs; done; \
    mkdir -p /rootfs/var/lib/dpkg/status.d; \
    for deb in *.deb; do \
        name=$(dpkg-deb -f "$deb" Package); \
        dpkg-deb -f "$deb" Package Version Architecture Source > "/rootfs/var/lib/dpkg/status.d/$name"; \
    done; \
    rm -rf /rootfs/usr/share/doc /rootfs/usr/share/man /rootfs/usr/share/info \
           /rootfs/usr/share/lintian /rootfs/usr/share/locale /rootfs/usr/share/gcc \
           /rootfs/usr/share/gdb /rootfs/usr/lib/x86_64-linux-gnu/gconv \
           /rootfs/usr/lib/x86_64-linux-gnu/engines-3 /rootfs/usr/lib/x86_64-linux-gnu/ossl-modules \
           /rootfs/usr/sbin /rootfs/usr/bin /rootfs/sbin /rootfs/bin /rootfs/etc/init.d \
           /rootfs/etc/ld.so.conf.d /rootfs/usr/libexec; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/home/nonroot /rootfs/root; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    chmod 1777 /rootfs/tmp; chmod 700 /rootfs/root; \
    chown 65532:65532 /rootfs/home/nonroot; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > /rootfs/etc/passwd; \
    printf 'root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n' > /rootfs/etc/group; \
    printf 'hosts: files dns\n' > /rootfs/etc/nsswitch.conf; \
    cp /etc/os-release /rootfs/etc/os-release; \
    ln -sf /usr/share/zoneinfo/Etc/UTC /rootfs/etc/localtime

FROM scratch
COPY --from=unpack /rootfs/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
LABEL org.opencontainers.image.description="made locally by scripts/docker-base-images.sh from Debian bookworm packages"
