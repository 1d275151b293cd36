#!/usr/bin/env bash
# Where an ingest request's time goes: `perf` samples the ingest benchmark's process (the
# server and its load generator share it, as they share the machine) during one 20 s run of
# the default configuration, and the samples are summed by component (SQLite, the HTTP
# server, the load generator's client, JSON, the runtime, the kernel...). On PostgreSQL the
# whole machine is sampled, as the database's processes share it.
#
#   scripts/profile-ingest.sh [sqlite|postgres]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
backend="${1:-sqlite}"
"$root/scripts/services.sh"
if ! command -v perf >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
bench="$(cargo bench -p server --bench ingest --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ingest" and m.get("executable"):
        print(m["executable"])')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
if [[ $backend == postgres ]]; then
  # The database runs in processes of its own: the whole machine is sampled, and split by
  # process first (the server and its load generator, PostgreSQL, idle), then the
  # database's busiest functions.
  perf record -a -q -F 499 -o "$out/perf.data" -- "$bench" --bench --profile "$backend"
  echo "share of the machine's samples by process:"
  perf report -i "$out/perf.data" --no-children --sort comm --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -4
  echo "PostgreSQL's busiest functions (share of the machine's samples):"
  perf report -i "$out/perf.data" --no-children --comm postgres --sort sym --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -12
  exit
fi
perf record -q -F 499 -o "$out/perf.data" -- "$bench" --bench --profile "$backend"
perf report -i "$out/perf.data" --no-children --sort comm,dso,sym --stdio 2>/dev/null |
  python3 "$root/scripts/perf-components.py"
