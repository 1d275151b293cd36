#!/usr/bin/env bash
# Proves the browser build carries no server-side code and no secrets.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

forbidden=(diesel diesel-async diesel_migrations libsqlite3-sys tokio tokio-postgres reqwest
  deadpool deadpool-redis redis axum hyper leptos_axum tower-http server)
status=0
for crate in "${forbidden[@]}"; do
  # -e normal: code compiled into the WASM (proc-macros and build scripts run on the host).
  # An absent crate prints nothing (and may still exit 0), so judge by the output.
  tree="$(cargo tree -p frontend --target wasm32-unknown-unknown -e normal -i "$crate" 2>/dev/null || true)"
  if [[ -n "$tree" ]]; then
    echo "FAIL: the browser build depends on $crate:"
    head -20 <<<"$tree"
    status=1
  fi
done

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

if [[ $status -eq 0 ]]; then
  echo "ok: the browser build holds no server crates (${#forbidden[@]} checked) and no secrets"
fi
exit $status
