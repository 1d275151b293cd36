#!/usr/bin/env bash
# Proves the browser build carries no server-side code and no secrets, and that the pure
# core (crates/domain) builds for wasm32 without async runtime, database or HTTP crates.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

target=wasm32-unknown-unknown
forbidden=(diesel diesel-async diesel_migrations libsqlite3-sys tokio tokio-postgres reqwest
  deadpool deadpool-redis redis axum hyper leptos_axum tower-http server)
# The core may not even use what the browser build needs (leptos, http, futures).
domain_forbidden=("${forbidden[@]}" futures http leptos)
status=0

# check_deps PACKAGE CRATE...: fails when PACKAGE's wasm32 build links any CRATE.
# -e normal: code compiled into the WASM (proc-macros and build scripts run on the host).
# One listing of the whole graph rather than `cargo tree -i` per crate: -i fails (and so
# would pass silently) when a name is ambiguous, e.g. two versions of http in the lockfile.
check_deps() {
  local package="$1" deps crate version found=0
  shift
  if ! deps="$(cargo tree -p "$package" --target "$target" -e normal --prefix none --format '{p}')"; then
    echo "FAIL: cargo tree -p $package failed"
    status=1
    return
  fi
  for crate in "$@"; do
    while read -r version; do
      echo "FAIL: the $package wasm build depends on $crate $version:"
      cargo tree -p "$package" --target "$target" -e normal -i "$crate@${version#v}" | head -20
      found=1
    done < <(awk -v c="$crate" '$1 == c { print $2 }' <<<"$deps" | sort -u)
  done
  if [[ $found -ne 0 ]]; then
    status=1
  fi
}

check_deps frontend "${forbidden[@]}"

wasm="target/site/pkg/frontend_bg.wasm"
if [[ -f "$wasm" ]]; then
  for needle in AGENT_TOKEN ADMIN_TOKEN DATABASE_URL REDIS_URL PROXMOX_SECRET vmhc_agent_ vmhc_admin_ token_hash; do
    if grep -aq "$needle" "$wasm" target/site/pkg/frontend.js; then
      echo "FAIL: the browser build contains '$needle'"
      status=1
    fi
  done
else
  echo "note: $wasm not built yet; only the dependency check ran"
fi

domain_checked=0
if [[ -d crates/domain ]]; then
  check_deps domain "${domain_forbidden[@]}"
  if ! cargo build -q -p domain --target "$target"; then
    echo "FAIL: domain does not build for $target"
    status=1
  fi
  domain_checked=1
else
  echo "note: crates/domain does not exist yet; its purity check was skipped"
fi

if [[ $status -eq 0 ]]; then
  echo "ok: the browser build holds no server crates (${#forbidden[@]} checked) and no secrets"
  if [[ $domain_checked -eq 1 ]]; then
    echo "ok: domain builds for $target without runtime, database or HTTP crates (${#domain_forbidden[@]} checked)"
  fi
fi
exit $status
