#!/usr/bin/env bash
# Smoke test of the run command: starts scripts/run.sh as a fresh clone would (HTTPS with a
# generated certificate, no user yet) and checks that the dashboard and the API answer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The builds run.sh starts with, done first: on a clean clone they take longer than any
# sensible start-up deadline (over 20 minutes on two cores), and the deadline below is for
# the server coming up, not for the compiler. run.sh finds them done.
started=$SECONDS
scripts/build-frontend.sh
cargo build --release -p server
echo "smoke: front end and server built in $((SECONDS - started)) s"

port="${SMOKE_PORT:-38080}"
data="$(mktemp -d)"
log="$data/server.log"
LISTEN_ADDR="127.0.0.1:$port" DATA_DIR="$data" DATABASE_URL="" REDIS_URL="" \
  setsid "$root/scripts/run.sh" >"$log" 2>&1 &
pid=$!
cleanup() { kill -- -"$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

deadline=$((SECONDS + 300))
base="https://127.0.0.1:$port"
# The generated certificate is the only one trusted: the server must present it.
tls() { curl -fsS --cacert "$data/tls-cert.pem" "$@"; }
until [[ -s "$data/tls-cert.pem" ]] && tls "$base/api/health" >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "smoke: the run command exited early"; tail -50 "$log"; exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "smoke: no answer within 5 minutes of starting"; tail -50 "$log"; exit 1
  fi
  sleep 2
done

[[ "$(tls -o /dev/null -w '%{redirect_url}' "$base/")" == "$base/setup" ]] ||
  { echo "smoke: with no user the dashboard does not lead to setup"; exit 1; }
page="$(tls "$base/setup")"
grep -q "Create the first admin" <<<"$page" || { echo "smoke: setup page not rendered"; exit 1; }
grep -q "frontend_bg.wasm\|frontend.js" <<<"$page" || { echo "smoke: hydration script missing"; exit 1; }
tls "$base/pkg/frontend_bg.wasm" -o /dev/null || { echo "smoke: WASM not served"; exit 1; }
[[ "$(tls "$base/api/health")" == '{"status":"ok"}' ]] || { echo "smoke: anonymous health says more than ok"; exit 1; }
# The container's and service manager's health check: the same server, through the binary.
LISTEN_ADDR="127.0.0.1:$port" DATA_DIR="$data" "$root/target/release/vm-healthcheck" healthcheck ||
  { echo "smoke: vm-healthcheck healthcheck failed against a healthy server"; exit 1; }
if LISTEN_ADDR="127.0.0.1:1" DATA_DIR="$data" "$root/target/release/vm-healthcheck" healthcheck 2>/dev/null; then
  echo "smoke: vm-healthcheck healthcheck passed with no server there"; exit 1
fi
[[ "$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$data/tls-cert.pem" "$base/api/vms")" == 401 ]] ||
  { echo "smoke: the fleet is readable anonymously"; exit 1; }
[[ "$(stat -c %a "$data/setup-code")" == 600 ]] || { echo "smoke: setup code missing or readable by others"; exit 1; }
grep -q "sha256_fingerprint=" "$data/tls-fingerprint" || { echo "smoke: no certificate fingerprint"; exit 1; }
[[ -s "$data/vm-healthcheck.db" ]] || { echo "smoke: SQLite database not created"; exit 1; }
[[ -s "$data/agent-token" ]] || { echo "smoke: agent token not generated"; exit 1; }
if grep -q "$(cat "$data/agent-token")" "$log"; then echo "smoke: token leaked to the log"; exit 1; fi
echo "smoke: 1 passed, 0 failed"
