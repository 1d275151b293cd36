#!/usr/bin/env bash
# Runs the whole test suite: unit tests, API and storage tests on SQLite and PostgreSQL,
# the Redis fault test, the dashboard in headless Chromium, the agent scripts, and a real
# Debian guest under QEMU (scripts/vm-e2e.sh prepares and caches it).
# Under cargo-nextest: one process per test, each with a time limit (.config/nextest.toml),
# so a hung test is killed and named instead of stalling the run. Then the number of tests
# that passed must reach the floor in .ci/test-floor, so tests cannot vanish unnoticed.
#
#   scripts/test.sh [NEXTEST ARGS...]   the suite; with arguments (e.g. a filter) the floor
#                                       check is skipped
#   scripts/test.sh --self-test         proves the time limit kills a hung test (seconds)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v cargo-nextest >/dev/null; then
  echo "cargo-nextest is needed: cargo install cargo-nextest --locked" >&2
  exit 1
fi

# Runs the deliberately hanging test under the short hang-check profile and expects nextest
# to fail the run and name that test as timed out.
hang_self_test() {
  local out status=0
  echo "==> time-limit self-test (a test that hangs must be killed and named)"
  out="$(VMHC_HANG_SELF_TEST=1 cargo nextest run -p server --test hang_self_test \
    --profile hang-check --run-ignored only --no-tests fail 2>&1)" || status=$?
  if [[ $status -eq 0 ]]; then
    echo "$out"
    echo "FAIL: a test that never ends passed; the time limit does not work" >&2
    return 1
  fi
  if ! grep -Eq 'TIMEOUT.*hangs_until_the_runner_kills_it' <<<"$out"; then
    echo "$out"
    echo "FAIL: the run failed but nextest did not report the hanging test as TIMEOUT" >&2
    return 1
  fi
  grep -E 'TIMEOUT.*hangs_until_the_runner_kills_it' <<<"$out" | head -1
  echo "ok: the hanging test was killed and named"
}

if [[ ${1:-} == --self-test ]]; then
  hang_self_test
  exit
fi

"$root/scripts/services.sh"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "==> installing chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The metrics tests parse /metrics with the reference OpenMetrics parser; the mail test
# runs a local SMTP server; the API test validates the OpenAPI document; the hostile-input
# test (server/tests/it/hostile.rs) feeds the API what schemathesis generates from it.
if ! python3 -c 'import prometheus_client, aiosmtpd, openapi_spec_validator, schemathesis' 2>/dev/null; then
  echo "==> installing prometheus-client, aiosmtpd, openapi-spec-validator and schemathesis (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check \
    'prometheus-client==0.21.1' 'aiosmtpd==1.4.6' 'openapi-spec-validator==0.7.2' \
    'schemathesis==4.32.5'
fi
"$root/scripts/build-frontend.sh"
# The real-guest scenarios (server/tests/it/vm_e2e.rs) boot the cached Debian guest;
# the first run builds it (a few minutes), later runs reuse it.
guest_env="$("$root/scripts/vm-e2e.sh" --print-env)"
while IFS= read -r line; do
  export "${line?}"
done <<<"$guest_env"

export TEST_PG_URL="${TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"

# The digest server/tests/it/common.rs names the template after: SHA-256 over
# migrations/postgres, every relative path in byte order followed by NUL, contents, NUL.
migrations_hash() {
  (
    cd "$root/migrations/postgres"
    find . -type f -printf '%P\n' | LC_ALL=C sort | while IFS= read -r file; do
      printf '%s\0' "$file"
      cat -- "$file"
      printf '\0'
    done
  ) | sha256sum | cut -c1-16
}

# Every test process clones its databases, vmhc_t_<pid>_<name>, from one template
# vmhc_tmpl_<migrations hash> shared by all processes and runs (server/tests/it/common.rs).
# Drops the databases of processes that are gone, never those of a run still going beside
# this one, and templates of other migrations (older checkouts, or vmhc_tmpl_<pid> of the
# per-process scheme; those only once their process is gone).
drop_stale_test_databases() {
  local names name pid current
  current="vmhc_tmpl_$(migrations_hash)"
  names="$(psql "$TEST_PG_URL" -Atqc \
    "SELECT datname FROM pg_database WHERE datname ~ '^vmhc_(t_[0-9]+_|tmpl_)'")"
  while read -r name; do
    [[ -n $name && $name != "$current" ]] || continue
    if [[ $name =~ ^vmhc_(t|tmpl)_([0-9]+)(_|$) ]]; then
      pid="${BASH_REMATCH[2]}"
      # kill -0 also fails on a live process of another user; /proc tells those apart.
      if kill -0 "$pid" 2>/dev/null || [[ -d /proc/$pid ]]; then
        continue
      fi
      PGOPTIONS="-c client_min_messages=warning" psql "$TEST_PG_URL" -qc \
        "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" >/dev/null
    else
      # Without FORCE: a template another checkout is still migrating stays.
      PGOPTIONS="-c client_min_messages=warning" psql "$TEST_PG_URL" -qc \
        "DROP DATABASE IF EXISTS \"$name\"" >/dev/null 2>&1 || true
    fi
  done <<<"$names"
}
drop_stale_test_databases

echo "==> Windows agent: PowerShell grammar check"
NODE_NO_WARNINGS=1 node scripts/check-powershell.mjs agents/*.ps1

# The crates have no doctests (each sets doctest = false), so nextest, which skips
# doctests, runs every test there is.
# Not frontend: building it in the same run would switch on app's hydrate
# feature inside the server.
log="$(mktemp)"
# The test processes have ended by then, so this also drops this run's databases.
trap 'rm -f "$log"; drop_stale_test_databases || true' EXIT
status=0
cargo nextest run -p domain -p proxmox -p app -p server "$@" 2>&1 | tee "$log" || status=$?

# One closing line for the whole suite, from nextest's summary, e.g.
# "Summary [ 512.3s] 250 tests run: 248 passed (3 slow), 1 failed, 1 timed out, 4 skipped".
summary="$(grep -E '^ *Summary \[' "$log" | tail -1 || true)"
if [[ -z $summary ]]; then
  echo "FAIL: nextest printed no summary (the build or the test listing failed)" >&2
  echo "0 passed, 0 failed"
  exit 1
fi
count() { { grep -Eo "[0-9]+ $1" <<<"$summary" || true; } | awk '{ n += $1 } END { print n + 0 }'; }
passed="$(count passed)"
failed=$(($(count failed) + $(count 'timed out')))
echo "$passed passed, $failed failed"
if [[ $status -ne 0 ]]; then
  exit "$status"
fi

if [[ $# -eq 0 ]]; then
  floor="$(grep -Ev '^[[:space:]]*(#|$)' "$root/.ci/test-floor" | tr -d '[:space:]')"
  if ! [[ $floor =~ ^[0-9]+$ ]]; then
    echo "FAIL: .ci/test-floor holds no number" >&2
    exit 1
  fi
  if ((passed < floor)); then
    echo "FAIL: $passed tests passed, fewer than the floor of $floor in .ci/test-floor." >&2
    echo "      Tests were removed or are no longer compiled in (a dropped 'mod' line?)." >&2
    echo "      If that is intended, lower the floor in .ci/test-floor in the same commit." >&2
    exit 1
  fi
  echo "ok: $passed tests passed, floor $floor (.ci/test-floor)"
fi
