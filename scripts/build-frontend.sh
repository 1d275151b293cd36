#!/usr/bin/env bash
# Builds the browser front end (WASM + JS glue + CSS) into target/site/pkg with Trunk, and
# fails when the WASM, gzipped at -9, exceeds its budget: 400 KB (400000 bytes). The
# budget can be set with WASM_GZIP_BUDGET (bytes), e.g. to see the check fail.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tools.sh
. "$root/scripts/tools.sh"
cd "$root"
trunk build --release
wasm="target/site/pkg/frontend_bg.wasm"
budget="${WASM_GZIP_BUDGET:-400000}"
if ! [[ $budget =~ ^[0-9]+$ ]]; then
  echo "WASM_GZIP_BUDGET must be a number of bytes, not '$budget'" >&2
  exit 1
fi
size="$(stat -c %s "$wasm")"
gzipped="$(gzip -9 -c "$wasm" | wc -c)"
echo "==> front end built: $size bytes WASM, $gzipped bytes gzipped (budget $budget)"
if ((gzipped > budget)); then
  echo "FAIL: $wasm is $gzipped bytes gzipped, over the budget of $budget bytes" >&2
  exit 1
fi
