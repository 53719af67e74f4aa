# order-api image: a static binary on distroless/static, nothing else.
#
#   docker build -t order-api .        (or `make docker-build`; `make up` builds it through compose)
#
# Build arguments (all optional), which become the image's OCI annotation labels:
#   VERSION   the release, default the version in Cargo.toml (`make release-check` keeps the two
#             equal);
#   REVISION  the git commit (`make docker-build` and `make up` pass `git rev-parse HEAD`); the
#             build context has no .git, so this is also what `order-api --version` reports
#             (default `unknown`);
#   SOURCE    where the source is (`make` passes the `origin` remote's URL when there is one).
#
# Build stage: the official Rust image. Final stage: gcr.io/distroless/static-debian12, which
# holds only a CA bundle, tzdata, /etc/passwd with the `nonroot` user and nsswitch.conf; no
# shell, no libc, no package manager. The binary links glibc statically (`+crt-static`), so
# it needs no shared library at all. Resolving the `db` service name still works: since
# glibc 2.34 the `files` and `dns` NSS modules are built into libc itself, and distroless's
# nsswitch.conf names only those (`hosts: files dns`).
#
# Alternatives measured: distroless/cc (glibc, libgcc, libssl, libstdc++) is ~24 MB before the
# binary; debian:bookworm-slim ~75 MB. musl on scratch would be as small, but the musl target
# is not installed with the official image and its allocator is slow under threads.

FROM rust:1-slim-bookworm AS build
WORKDIR /app
# Static glibc, and symbols stripped from the binary (panic messages are unaffected).
# RUSTFLAGS apply only to the `--target` given below, not to build scripts and proc macros,
# which must stay dynamic; so every cargo call names the target explicitly.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# 1. Dependencies in a layer of their own: built against dummy sources, so this layer is
#    reused until Cargo.toml or Cargo.lock change. The target is the image's own host triple
#    (x86_64 or aarch64), so the same file builds on either.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --target "$(rustc -vV | sed -n 's/^host: //p')" \
    && rm -rf src

# 2. The crate itself. build.rs embeds sql/*.sql in the binary, so sql/ comes along.
#    `touch`: COPY keeps the files' old modification times, which cargo could take as older
#    than the dummy build above and skip the rebuild.
#    REVISION is declared here, after the dependency layer, so that a new commit does not
#    invalidate that layer's cache.
COPY build.rs ./
COPY sql sql
COPY src src
ARG REVISION=unknown
RUN touch build.rs src/main.rs src/lib.rs \
    && target="$(rustc -vV | sed -n 's/^host: //p')" \
    && ORDER_API_GIT_COMMIT="$REVISION" cargo build --release --locked --target "$target" \
    && cp "target/$target/release/order-api" /usr/local/bin/order-api \
    && if readelf -l /usr/local/bin/order-api | grep -q INTERP; then \
         echo "order-api is dynamically linked: it cannot run on distroless/static" >&2; exit 1; \
       fi

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=1.0.0
ARG REVISION=unknown
ARG SOURCE=unknown
# OCI image annotations (github.com/opencontainers/image-spec, annotations.md).
LABEL org.opencontainers.image.title="order-api" \
      org.opencontainers.image.description="Order processing API: products, orders, inventory reservation and cancellation on PostgreSQL" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE"
COPY --from=build /usr/local/bin/order-api /usr/local/bin/order-api
# The `nonroot` user of distroless (uid/gid 65532), by number so that a runtime can check
# `runAsNonRoot` without reading /etc/passwd.
USER 65532:65532
EXPOSE 3000
# `order-api healthcheck` calls GET /health on the local API_PORT and exits 0 or 1: no curl
# needed. A short interval makes the container healthy (and compose start what depends on
# it) about 2 s after the API is up; --start-period covers waiting for the database.
HEALTHCHECK --interval=2s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/order-api", "healthcheck"]
# The binary itself is PID 1 (exec form, no shell): it receives `docker stop`'s SIGTERM and
# drains in-flight requests for up to SHUTDOWN_GRACE_MS (8 s, under Docker's 10 s) before
# exiting 0.
ENTRYPOINT ["/usr/local/bin/order-api"]
CMD ["serve"]
