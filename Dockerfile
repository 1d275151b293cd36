# Multi-stage build: the front end with Trunk, the server with cargo, a slim runtime image.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-frontend.sh && cargo build --release -p server

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/vm-healthcheck --create-home vmhc
COPY --from=build /src/target/release/vm-healthcheck /usr/local/bin/vm-healthcheck
COPY --from=build /src/target/site /opt/vm-healthcheck/site
USER vmhc
WORKDIR /var/lib/vm-healthcheck
# MALLOC_ARENA_MAX: two malloc arenas, not one per thread (BENCHMARKS.md, 100,000 VMs).
ENV SITE_ROOT=/opt/vm-healthcheck/site \
    DATA_DIR=/var/lib/vm-healthcheck/data \
    LISTEN_ADDR=0.0.0.0:3000 \
    MALLOC_ARENA_MAX=2
EXPOSE 3000
VOLUME ["/var/lib/vm-healthcheck/data"]
# 200 from /api/health: storage answers and the scheduler runs (not merely an open port).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s CMD ["vm-healthcheck", "healthcheck"]
CMD ["vm-healthcheck"]
