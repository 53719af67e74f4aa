# order-api image: a static binary on distroless/static, nothing else.
#
#   docker build -t order-api .        (or `make docker-build`; `make up` builds it through compose)
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
COPY build.rs ./
COPY sql sql
COPY src src
RUN touch build.rs src/main.rs src/lib.rs \
    && target="$(rustc -vV | sed -n 's/^host: //p')" \
    && cargo build --release --locked --target "$target" \
    && cp "target/$target/release/order-api" /usr/local/bin/order-api \
    && if readelf -l /usr/local/bin/order-api | grep -q INTERP; then \
         echo "order-api is dynamically linked: it cannot run on distroless/static" >&2; exit 1; \
       fi

FROM gcr.io/distroless/static-debian12:nonroot
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
