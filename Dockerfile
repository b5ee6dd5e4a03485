# syntax=docker/dockerfile:1
# presence-bridge: multi-stage build. The build stage compiles the release binary with the
# locked dependency versions; the runtime stage is a slim Debian with the binary, a non-root
# user, the schema migrations (embedded in the binary), and curl for the health check.
#
#   docker build -t presence-bridge .
#   docker run -v ./config:/etc/presence-bridge:ro -v spool:/var/lib/presence-bridge \
#     -e PRESENCE_BRIDGE__XMPP__PASSWORD=... -p 8080:8080 presence-bridge
#
# Not built in this project's CI (no container engine there); compose.yaml is validated with
# `docker-compose config`.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in writer api engine; do echo 'fn main() {}' > benches/$b.rs; done \
    && cargo build --release --locked --bin presence-bridge || true
COPY src ./src
COPY schema ./schema
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin presence-bridge

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/presence-bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /etc/presence-bridge /var/lib/presence-bridge/spool \
    && chown -R bridge:bridge /var/lib/presence-bridge
COPY --from=build /src/target/release/presence-bridge /usr/local/bin/presence-bridge
COPY config/bridge.example.toml /usr/share/doc/presence-bridge/bridge.example.toml
USER bridge
WORKDIR /var/lib/presence-bridge
# Inside a container the API must listen on every interface of the container's network.
ENV PRESENCE_BRIDGE__HTTP__BIND=0.0.0.0:8080 \
    PRESENCE_BRIDGE__STORE__SPOOL_DIR=/var/lib/presence-bridge/spool \
    PRESENCE_BRIDGE__LOG__FORMAT=json
VOLUME ["/etc/presence-bridge", "/var/lib/presence-bridge"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM: WebSockets closed with 1001, the store flushed to Postgres or the spool, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["presence-bridge"]
CMD ["run", "--config", "/etc/presence-bridge/bridge.toml"]
