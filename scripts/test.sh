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
# Each test process makes a template database vmhc_tmpl_<pid> and one database per test,
# vmhc_t_<pid>_<name>, cloned from it (server/tests/it/common.rs). Drops those of processes
# that are gone, never those of a run still going beside this one.
drop_stale_test_databases() {
  local names name pid
  names="$(psql "$TEST_PG_URL" -Atqc \
    "SELECT datname FROM pg_database WHERE datname ~ '^vmhc_(t|tmpl)_[0-9]+(_|$)'")"
  while read -r name; do
    [[ $name =~ ^vmhc_(t|tmpl)_([0-9]+) ]] || continue
    pid="${BASH_REMATCH[2]}"
    # kill -0 also fails on a live process of another user; /proc tells those apart.
    if kill -0 "$pid" 2>/dev/null || [[ -d /proc/$pid ]]; then
      continue
    fi
    PGOPTIONS="-c client_min_messages=warning" psql "$TEST_PG_URL" -qc \
      "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" >/dev/null
  done <<<"$names"
}
drop_stale_test_databases

echo "==> Windows agent: PowerShell grammar check"
NODE_NO_WARNINGS=1 node scripts/check-powershell.mjs agents/*.ps1

# Not frontend: building it in the same run would switch on app's hydrate
# feature inside the server.
log="$(mktemp)"
# The test processes have ended by then, so this also drops this run's databases.
trap 'rm -f "$log"; drop_stale_test_databases || true' EXIT
cargo test -p domain -p proxmox -p app -p server "$@" 2>&1 | tee "$log"
# One closing line for the whole suite, summed over the test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
