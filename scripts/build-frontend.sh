#!/usr/bin/env bash
# Builds the browser front end (WASM + JS glue + CSS) into target/site/pkg with Trunk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tools.sh
. "$root/scripts/tools.sh"
cd "$root"
trunk build --release
wasm="target/site/pkg/frontend_bg.wasm"
echo "==> front end built: $(stat -c %s "$wasm") bytes WASM, $(gzip -9 -c "$wasm" | wc -c) bytes gzipped"
