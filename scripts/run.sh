#!/usr/bin/env bash
# Builds the front end and the server in release mode and runs the server.
# Dashboard: http://localhost:3000 (LISTEN_ADDR). Storage: SQLite under ./data unless
# DATABASE_URL says otherwise. Configuration: the environment and an optional .env.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/build-frontend.sh"
cargo build --release -p server
# Two malloc arenas, not one per thread: a third less memory with a large fleet
# (BENCHMARKS.md); glibc reads it at start, so it cannot come from .env.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
exec "$root/target/release/vm-healthcheck"
