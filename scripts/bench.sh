#!/usr/bin/env bash
# Benchmarks: heartbeat ingest throughput (both backends, beside a reference handler), a
# 100,000-VM fleet on each backend, a profile of the ingest path, chart reads over a large
# history, and the Linux agent's cost per report.
# Figures and how to read them: BENCHMARKS.md.
#
#   scripts/bench.sh           the full measurement (release builds, several minutes)
#   scripts/bench.sh --smoke   CI's check, seconds: a short ingest run per backend and commit
#                              mode that fails unless every 200 answered is a stored row
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/services.sh"

if [[ ${1:-} == --smoke ]]; then
  echo "==> ingest smoke: stored rows == 200s answered, SQLite and PostgreSQL"
  # The test profile: reuses what the test suite built instead of a release build.
  cargo test -q -p server --bench ingest -- --smoke
  echo "==> chart smoke: 30-day and 24-hour charts read the hour and minute rollups"
  cargo test -q -p server --bench history -- --smoke
  exit
fi

echo "==> ingest"
cargo bench -p server --bench ingest

echo "==> 100,000 VMs on each backend: creation, memory, reads, idle rounds, stale detection"
scripts/fleet-scale.sh sqlite
scripts/fleet-scale.sh postgres

echo "==> 100,000 VMs' spooled reports at once after an outage, each backend"
scripts/fleet-scale.sh sqlite 100000 180000 burst
scripts/fleet-scale.sh postgres 100000 180000 burst

echo "==> one VM of 100,000 falls silent: down after its deadline, then the first power action"
# The release server as its own process; the test (fake Proxmox, clients) in the test build.
cargo build --release -q -p server
cargo test -q -p server --test it -- --ignored --exact --nocapture \
  scale::one_silent_vm_among_100000_is_down_and_acted_on_promptly

echo "==> where an ingest request's time goes (perf, SQLite; the whole machine on PostgreSQL)"
scripts/profile-ingest.sh sqlite
scripts/profile-ingest.sh postgres

echo "==> chart reads over 10,000 VMs of history"
cargo bench -p server --bench history

echo "==> Linux agent: CPU time per report (--tick, 20 runs against a local server)"
data="$(mktemp -d)"
port=38090
cargo build --release -p server
AGENT_TOKEN=bench-agent ADMIN_TOKEN=bench-admin DATA_DIR="$data" LISTEN_ADDR="127.0.0.1:$port" TLS=off \
  RUST_LOG=warn "$root/target/release/vm-healthcheck" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$data"' EXIT
until curl -fsS "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; do sleep 0.2; done

python3 "$root/scripts/agent-cost.py" "http://127.0.0.1:$port" bench-agent 20
