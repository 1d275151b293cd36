#!/usr/bin/env bash
# A large fleet on one server (release build): creation rate, RSS while creating, after, and
# while the API and the fleet page are read, the idle scheduler round, and how soon after its
# deadline each silent VM is marked down. With "burst", the fleet's spooled reports arriving
# all at once instead: the ingest queue is shrunk to BURST_QUEUE (default 64) so that
# BURST_THREADS clients (default 256) overfill it, as 100,000 agents would the default 20,000.
# Figures: BENCHMARKS.md.
#
#   scripts/fleet-scale.sh [sqlite|postgres] [VMS] [STALE_MS] [burst]
#                                                   default: sqlite 100000 180000
#   VMHC_BINARY=path: measure that server binary instead of building the release
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
backend="${1:-sqlite}"
vms="${2:-100000}"
stale_ms="${3:-180000}"
mode="${4:-scale}"
"$root/scripts/services.sh"
binary="${VMHC_BINARY:-}"
if [[ -z $binary ]]; then
  cargo build --release -q -p server
  binary="$root/target/release/vm-healthcheck"
fi

data="$(mktemp -d)"
port=38190
# As shipped (the unit, the image and scripts/run.sh set it): MALLOC_ARENA_MAX=0 measures
# glibc's default of one arena per thread.
env=(MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}" AGENT_TOKEN=scale-fleet-token-0123456789 ADMIN_TOKEN=scale-admin-token-0123456789
  DATA_DIR="$data" LISTEN_ADDR="127.0.0.1:$port" TLS=off RUST_LOG=warn
  STALE_TIMEOUT_MS="$stale_ms" ENROLMENT_RATE_PER_MINUTE=100000000 REPORT_RATE_PER_MINUTE=100000000
  REPORT_BURST=100000000 SITE_ROOT="$root/target/site")
case "$backend" in
  sqlite) ;;
  postgres)
    db="vmhc_fleet_scale_$$"
    psql -q -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $db" >/dev/null
    env+=(DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db")
    ;;
  *) echo "usage: $0 [sqlite|postgres] [VMS] [STALE_MS] [burst]" >&2; exit 2 ;;
esac
case "$mode" in
  scale) ;;
  burst) env+=(INGEST_QUEUE_CAPACITY="${BURST_QUEUE:-64}") ;;
  *) echo "usage: $0 [sqlite|postgres] [VMS] [STALE_MS] [burst]" >&2; exit 2 ;;
esac

env "${env[@]}" "$binary" &
server_pid=$!
cleanup() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$data"
  if [[ -n ${db:-} ]]; then
    psql -q -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE IF EXISTS $db" >/dev/null || true
  fi
}
trap cleanup EXIT
until curl -fsS "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; do sleep 0.2; done

echo "==> $vms VMs on $backend (stale timeout ${stale_ms} ms, $mode)"
python3 "$root/scripts/fleet-scale.py" "http://127.0.0.1:$port" "$server_pid" \
  scale-fleet-token-0123456789 scale-admin-token-0123456789 "$vms" "$stale_ms" "$mode"
