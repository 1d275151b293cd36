#!/usr/bin/env bash
# Installs the server as a systemd service: a dedicated system user, the release binary,
# the dashboard's files, the unit (server/deploy/vm-healthcheck.service) and a settings file
# /etc/vm-healthcheck/env made from .env.example (kept if it exists), then enables and
# (re)starts the service: running it again from a newer checkout upgrades. Run from a
# checkout, as root.
#
#   scripts/install-server.sh                   build the release, install, enable, restart
#   scripts/install-server.sh --binary PATH     install this binary instead of building
#   scripts/install-server.sh --destdir DIR     stage everything under DIR (no user, no
#                                               systemctl): what packagers and CI use
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="" destdir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --destdir) destdir="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--destdir DIR]" >&2; exit 2 ;;
  esac
done

if [[ -z $binary ]]; then
  echo "==> building the release (a few minutes)"
  "$root/scripts/build-frontend.sh"
  (cd "$root" && cargo build --release -q -p server)
  binary="$root/target/release/vm-healthcheck"
fi
[[ -x $binary ]] || { echo "no executable server at $binary" >&2; exit 1; }
[[ -d $root/target/site/pkg ]] ||
  { echo "the dashboard is not built: run scripts/build-frontend.sh" >&2; exit 1; }

user=vm-healthcheck
if [[ -z $destdir ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "run as root" >&2; exit 1; }
  if ! id "$user" >/dev/null 2>&1; then
    echo "==> creating the system user $user"
    useradd --system --user-group --home-dir /var/lib/vm-healthcheck --no-create-home \
      --shell /usr/sbin/nologin "$user"
  fi
fi

echo "==> installing under ${destdir:-/}"
install -D -m 0755 "$binary" "$destdir/usr/local/bin/vm-healthcheck"
rm -rf "$destdir/usr/local/share/vm-healthcheck/site"
mkdir -p "$destdir/usr/local/share/vm-healthcheck"
cp -R "$root/target/site" "$destdir/usr/local/share/vm-healthcheck/site"
chmod -R u=rwX,go=rX "$destdir/usr/local/share/vm-healthcheck/site"
install -D -m 0644 "$root/README.md" "$destdir/usr/local/share/doc/vm-healthcheck/README.md"
install -D -m 0644 "$root/server/deploy/vm-healthcheck.service" \
  "$destdir/etc/systemd/system/vm-healthcheck.service"
env_file="$destdir/etc/vm-healthcheck/env"
if [[ ! -e $env_file ]]; then
  # Settings hold secrets (tokens, the Proxmox secret): readable by the service only.
  install -d -m 0750 "$(dirname "$env_file")"
  # Made 0640 before anything is written to it.
  install -m 0640 /dev/null "$env_file"
  sed -e 's|^DATA_DIR=.*|DATA_DIR=/var/lib/vm-healthcheck|' \
    -e 's|^SITE_ROOT=.*|SITE_ROOT=/usr/local/share/vm-healthcheck/site|' \
    "$root/.env.example" >"$env_file"
  [[ -n $destdir ]] || chgrp "$user" "$env_file"
  echo "    wrote $env_file from .env.example: set DATABASE_URL, the tokens and Proxmox there"
else
  # Kept, but never left readable by others.
  chmod 0640 "$env_file"
  [[ -n $destdir ]] || chgrp "$user" "$env_file"
  echo "    kept $env_file"
fi

if [[ -z $destdir ]]; then
  systemctl daemon-reload
  systemctl enable vm-healthcheck.service
  # A restart, not just a start: an upgrade must replace the running process with the new
  # binary (which applies the release's migrations as it starts).
  systemctl restart vm-healthcheck.service
  echo "==> running: systemctl status vm-healthcheck; logs: journalctl -u vm-healthcheck"
fi
