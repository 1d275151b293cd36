#!/usr/bin/env bash
# Benchmarks: heartbeat ingest throughput (both backends) and the Linux agent's cost per report.
# Figures and how to read them: BENCHMARKS.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/services.sh"

echo "==> ingest"
cargo bench -p server --bench ingest

echo "==> Linux agent: CPU time per report (--tick, 20 runs against a local server)"
data="$(mktemp -d)"
port=38090
cargo build --release -p server
AGENT_TOKEN=bench-agent ADMIN_TOKEN=bench-admin DATA_DIR="$data" LISTEN_ADDR="127.0.0.1:$port" \
  RUST_LOG=warn "$root/target/release/vm-healthcheck" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$data"' EXIT
until curl -fsS "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; do sleep 0.2; done

export VMHC_STATE_DIR="$data/agent" VMHC_AGENT_CONF="$data/none" SERVER_URL="http://127.0.0.1:$port" AGENT_TOKEN=bench-agent
mkdir -p "$VMHC_STATE_DIR"
bash agents/linux-agent.sh --tick # primes the CPU sample, as the timer's earlier runs would
samples=()
start_total="$(awk '{ print $16 + $17 }' /proc/$$/stat)"
for _ in $(seq 1 20); do
  # user + system CPU of the agent and every process it started, in milliseconds
  before="$(awk '{ print $16 + $17 }' /proc/$$/stat)"
  bash agents/linux-agent.sh --tick
  after="$(awk '{ print $16 + $17 }' /proc/$$/stat)"
  samples+=("$(( (after - before) * 1000 / $(getconf CLK_TCK) ))")
done
end_total="$(awk '{ print $16 + $17 }' /proc/$$/stat)"
echo "agent CPU per report: mean $(( (end_total - start_total) * 1000 / $(getconf CLK_TCK) / 20 )) ms over 20 runs"
printf '%s\n' "${samples[@]}" | sort -n | awk '{ a[NR] = $1 } END { printf "agent CPU per report: median %d ms, min %d ms, max %d ms (%d runs)\n", a[int((NR + 1) / 2)], a[1], a[NR], NR }'
