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

if ! command -v npm >/dev/null; then
  if [[ "$(id -u)" -eq 0 ]]; then
    echo "==> installing npm"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  else
    echo "npm is needed for wasm-opt: install it (apt-get install npm)" >&2
    exit 1
  fi
fi

# npm packages pinned in package-lock.json: binaryen 132 for wasm-opt (Debian's older binaryen
# produces WASM that fails to hydrate) and the PowerShell grammar for the Windows agent check.
if [[ "$(wasm-opt --version 2>/dev/null || true)" != *"version 132"* || ! -d "$root/node_modules/tree-sitter-powershell" ]]; then
  echo "==> installing pinned npm tools"
  (cd "$root" && npm ci --no-audit --no-fund)
fi
