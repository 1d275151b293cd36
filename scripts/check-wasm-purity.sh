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

# check_deps PACKAGE KNOWN MIN_LINES CRATE...: fails when PACKAGE's wasm32 build links any
# CRATE, and when the listing does not look like PACKAGE's real graph (PACKAGE itself on the
# first line, the dependency KNOWN in it, at least MIN_LINES lines), so that a listing that
# came back empty or truncated cannot pass as "nothing forbidden found".
# -e normal: code compiled into the WASM (proc-macros and build scripts run on the host).
# One listing of the whole graph rather than `cargo tree -i` per crate: -i fails (and so
# would pass silently) when a name is ambiguous, e.g. two versions of http in the lockfile.
check_deps() {
  local package="$1" known="$2" min_lines="$3" deps lines crate version found=0
  shift 3
  if ! deps="$(cargo tree -p "$package" --target "$target" -e normal --prefix none --format '{p}')"; then
    echo "FAIL: cargo tree -p $package failed"
    status=1
    return
  fi
  lines="$(grep -c . <<<"$deps" || true)"
  if ! head -1 <<<"$deps" | grep -q "^$package v"; then
    echo "FAIL: the dependency listing of $package does not start with $package itself"
    status=1
    return
  fi
  if ! awk -v c="$known" '$1 == c { found = 1 } END { exit !found }' <<<"$deps"; then
    echo "FAIL: the dependency listing of $package lacks $known, which it is known to use"
    status=1
    return
  fi
  if ((lines < min_lines)); then
    echo "FAIL: the dependency listing of $package has $lines lines, expected at least $min_lines"
    status=1
    return
  fi
  for crate in "$@"; do
    while read -r version; do
      echo "FAIL: the $package wasm build depends on $crate $version:"
      cargo tree -p "$package" --target "$target" -e normal -i "$crate@${version#v}" | head -20 || true
      found=1
    done < <(awk -v c="$crate" '$1 == c { print $2 }' <<<"$deps" | sort -u)
  done
  if [[ $found -ne 0 ]]; then
    status=1
  fi
  echo "checked: $package, $lines crates listed for $target, $# forbidden names"
}

# Minimum listing sizes: about a fifth of today's (542 for frontend, 33 for domain).
check_deps frontend leptos 100 "${forbidden[@]}"

# Built before this check (scripts/build-frontend.sh; in CI by the smoke test of the run
# command). A missing bundle fails: grepping nothing would prove nothing.
wasm="target/site/pkg/frontend_bg.wasm"
glue="target/site/pkg/frontend.js"
if [[ -s "$wasm" && -s "$glue" ]]; then
  for needle in AGENT_TOKEN ADMIN_TOKEN DATABASE_URL REDIS_URL PROXMOX_SECRET vmhc_agent_ vmhc_admin_ token_hash; do
    if grep -aq "$needle" "$wasm" "$glue"; then
      echo "FAIL: the browser build contains '$needle'"
      status=1
    fi
  done
else
  echo "FAIL: $wasm or $glue is missing or empty: build the front end first (scripts/build-frontend.sh)"
  status=1
fi

check_deps domain serde 10 "${domain_forbidden[@]}"
if ! cargo build -q -p domain --target "$target"; then
  echo "FAIL: domain does not build for $target"
  status=1
fi

if [[ $status -eq 0 ]]; then
  echo "ok: the browser build holds no server crates (${#forbidden[@]} checked) and no secrets"
  echo "ok: domain builds for $target without runtime, database or HTTP crates (${#domain_forbidden[@]} checked)"
fi
exit $status
