#!/usr/bin/env bash
# Hostile input for the parsers: random bytes and random JSON into the report parser and
# the Proxmox answer readers (crates/domain/tests/fuzz_report.rs,
# crates/proxmox/tests/fuzz_answers.rs). The suite runs each for a second or two; this runs
# each for FUZZ_SECONDS (default 600). A panic fails with the seed that reproduces it
# (arbtest prints it); a hang is killed after twice the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-600}"
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
  echo "FUZZ_SECONDS must be a number of seconds, not '$seconds'" >&2
  exit 2
fi
export FUZZ_MS=$((seconds * 1000))
cargo test -q -p domain --test fuzz_report --no-run
cargo test -q -p proxmox --test fuzz_answers --no-run
for target in \
  "domain fuzz_report random_bytes_never_panic_the_report_parser" \
  "domain fuzz_report random_reports_never_panic_and_what_is_accepted_is_in_the_contract" \
  "proxmox fuzz_answers random_guest_lists_never_panic_and_keep_only_known_guests" \
  "proxmox fuzz_answers random_text_never_panics_the_smbios_and_upid_readers"; do
  read -r crate test name <<<"$target"
  echo "==> $crate/$test::$name for $seconds s"
  timeout $((seconds * 2 + 60)) cargo test -q -p "$crate" --test "$test" -- --exact "$name"
done
echo "ok: no panic and no hang in $((seconds * 4)) s of generated input"
