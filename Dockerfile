# syntax=docker/dockerfile:1
# The moe-operator and moe-worker images for people who build with Docker or Buildah. The
# tested path is `cargo xtask images` (no daemon, reproducible digests); this file produces the
# same layout: the Debian packages pinned in images/debian.lock (glibc, libgcc, CA
# certificates, tzdata), a non-root user 65532, the stripped binary in /usr/local/bin.
#
#   docker build --target moe-worker   -t ghcr.io/moe-serve/moe-worker:0.1.0 .
#   docker build --target moe-operator -t ghcr.io/moe-serve/moe-operator:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins -p moe-operator -p moe-worker \
 && mkdir /out \
 && strip --strip-debug -o /out/moe-operator target/release/moe-operator \
 && strip --strip-debug -o /out/moe-worker target/release/moe-worker

FROM docker.io/library/debian:bookworm AS rootfs
COPY images/debian.lock /debian.lock
RUN set -eu; apt-get update; mkdir /debs /rootfs; cd /debs; \
    grep -v '^#' /debian.lock | while read -r name version sha; do \
      [ -n "$name" ] || continue; \
      apt-get download "$name=$version"; \
      echo "$sha  ${name}_$(echo "$version" | sed 's/:/%3a/')_amd64.deb" | sha256sum -c -; \
      dpkg-deb -x "${name}_$(echo "$version" | sed 's/:/%3a/')_amd64.deb" /rootfs; \
      mkdir -p /rootfs/var/lib/dpkg/status.d; \
      dpkg-deb --field "${name}_$(echo "$version" | sed 's/:/%3a/')_amd64.deb" > "/rootfs/var/lib/dpkg/status.d/$name"; \
    done; \
    cd /rootfs; \
    rm -rf usr/share/doc usr/share/man usr/share/info usr/share/lintian usr/share/locale \
           usr/share/bug usr/sbin usr/bin sbin bin etc/ca-certificates etc/ca-certificates.conf \
           usr/share/debconf; \
    mkdir -p etc/ssl/certs tmp root home/nonroot; \
    find usr/share/ca-certificates -name '*.crt' | LC_ALL=C sort | xargs cat > etc/ssl/certs/ca-certificates.crt; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > etc/passwd; \
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > etc/group; \
    printf 'passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' > etc/nsswitch.conf; \
    printf 'PRETTY_NAME="moe-serve base (Debian GNU/Linux 12 packages)"\nNAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\nHOME_URL="https://github.com/moe-serve/moe-serve"\n' > etc/os-release; \
    chmod 1777 tmp; chmod 700 root home/nonroot; chown 65532:65532 home/nonroot

FROM scratch AS base
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/moe-serve/moe-serve" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.licenses="Apache-2.0"

FROM base AS moe-operator
COPY --from=build /out/moe-operator /usr/local/bin/moe-operator
LABEL org.opencontainers.image.title="moe-operator"
ENTRYPOINT ["/usr/local/bin/moe-operator"]

FROM base AS moe-worker
COPY --from=build /out/moe-worker /usr/local/bin/moe-worker
LABEL org.opencontainers.image.title="moe-worker"
ENTRYPOINT ["/usr/local/bin/moe-worker"]
