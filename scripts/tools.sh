#!/usr/bin/env bash
# Installs the pinned build tools when missing, then puts them on PATH.
# Source it (`. scripts/tools.sh`); every step is skipped when already done.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/node_modules/.bin:$HOME/.cargo/bin:$PATH"

WASM_BINDGEN_VERSION=0.2.130
TRUNK_VERSION=0.21.14

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "==> adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

if [[ "$(wasm-bindgen --version 2>/dev/null || true)" != "wasm-bindgen $WASM_BINDGEN_VERSION" ]]; then
  echo "==> installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (about 3 minutes)"
  # Not --locked: its lock file pins a webpki-roots release the registry no longer serves.
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
fi

if [[ "$(trunk --version 2>/dev/null || true)" != "trunk $TRUNK_VERSION" ]]; then
  echo "==> installing trunk $TRUNK_VERSION (about 12 minutes)"
  cargo install trunk --version "$TRUNK_VERSION" --locked --force
fi

# wasm-opt from npm's binaryen 132: Debian's older binaryen produces WASM that fails to hydrate.
if [[ "$(wasm-opt --version 2>/dev/null || true)" != *"version 132"* ]]; then
  echo "==> installing binaryen 132 from npm"
  (cd "$root" && npm ci --no-audit --no-fund)
fi
