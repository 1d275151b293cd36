#!/usr/bin/env bash
# The fault suite (RELIABILITY.md). Its scenarios (server/tests/it/faults.rs and the
# replica, API and parser scenarios beside it) run in their short forms in every suite run
# (scripts/test.sh). This runs the compressed soak (server/tests/it/soak.rs): a simulated
# fleet hanging and recovering while faults fire at random.
#
#   scripts/faults.sh          the soak's short form: two minutes, 300 VMs (what .ci/run runs)
#   scripts/faults.sh --full   every scenario in its long form (FAULTS_FULL=1: twenty kills
#                              per backend, a minute of PostgreSQL outage, twenty Redis flaps,
#                              ten thousand generated API requests), the thirty-minute soak
#                              over 2,000 VMs, and scripts/fuzz.sh (ten minutes per target)
#
# SOAK_SECONDS, SOAK_VMS, SOAK_REPORT_MS and SOAK_SEED override the soak's length, size,
# report interval (the stale timeout is three of them) and seed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

case "${1:-}" in
  "") full=0 ;;
  --full) full=1 ;;
  *)
    echo "usage: scripts/faults.sh [--full]" >&2
    exit 2
    ;;
esac

# shellcheck source=scripts/tools.sh
. "$root/scripts/tools.sh"

if [[ $full -eq 1 ]]; then
  export FAULTS_FULL=1
  # 2,000 VMs every 10 s: what the test build stores per second with room for the faults.
  export SOAK_SECONDS="${SOAK_SECONDS:-1800}" SOAK_VMS="${SOAK_VMS:-2000}" SOAK_REPORT_MS="${SOAK_REPORT_MS:-10000}"
  echo "==> every fault scenario in its long form"
  "$root/scripts/test.sh" --profile faults -E 'test(/^(faults|failover|hostile)::/)'
  echo "==> the parsers' fuzz targets"
  FUZZ_SECONDS="${FUZZ_SECONDS:-600}" "$root/scripts/fuzz.sh"
fi

echo "==> the compressed soak (${SOAK_SECONDS:-120} s, ${SOAK_VMS:-300} VMs)"
"$root/scripts/test.sh" --profile faults --run-ignored only --no-capture -E 'test(/^soak::/)'
