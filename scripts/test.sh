#!/usr/bin/env bash
# Runs the whole test suite: unit tests, API and storage tests on SQLite and PostgreSQL,
# the Redis fault test, the dashboard in headless Chromium and the agent scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/services.sh"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "==> installing chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
"$root/scripts/build-frontend.sh"

export TEST_PG_URL="${TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
# Each test makes its own database; clear those left by interrupted earlier runs.
psql "$TEST_PG_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'vmhc_t_%'" |
  while read -r name; do psql "$TEST_PG_URL" -qc "DROP DATABASE IF EXISTS \"$name\"" >/dev/null; done

echo "==> Windows agent: PowerShell grammar check"
NODE_NO_WARNINGS=1 node scripts/check-powershell.mjs agents/*.ps1

# app and server only: building frontend in the same run would switch on app's hydrate
# feature inside the server.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test -p app -p server "$@" 2>&1 | tee "$log"
# One closing line for the whole suite, summed over the test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
