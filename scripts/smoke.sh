#!/usr/bin/env bash
# Smoke test of the run command: starts scripts/run.sh as a fresh clone would and checks
# that the dashboard and the API answer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

port="${SMOKE_PORT:-38080}"
data="$(mktemp -d)"
log="$data/server.log"
LISTEN_ADDR="127.0.0.1:$port" DATA_DIR="$data" DATABASE_URL="" REDIS_URL="" \
  setsid "$root/scripts/run.sh" >"$log" 2>&1 &
pid=$!
cleanup() { kill -- -"$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

deadline=$((SECONDS + 1200))
until curl -fsS "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "smoke: the run command exited early"; tail -50 "$log"; exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "smoke: no answer within 20 minutes"; tail -50 "$log"; exit 1
  fi
  sleep 2
done

page="$(curl -fsS "http://127.0.0.1:$port/")"
grep -q "vm-healthcheck" <<<"$page" || { echo "smoke: dashboard not rendered"; exit 1; }
grep -q "frontend_bg.wasm\|frontend.js" <<<"$page" || { echo "smoke: hydration script missing"; exit 1; }
curl -fsS "http://127.0.0.1:$port/pkg/frontend_bg.wasm" -o /dev/null || { echo "smoke: WASM not served"; exit 1; }
[[ -s "$data/vm-healthcheck.db" ]] || { echo "smoke: SQLite database not created"; exit 1; }
[[ -s "$data/agent-token" ]] || { echo "smoke: agent token not generated"; exit 1; }
if grep -q "$(cat "$data/agent-token")" "$log"; then echo "smoke: token leaked to the log"; exit 1; fi
echo "smoke: 1 passed, 0 failed"
