#!/usr/bin/env bash
# Installs (or removes) the vm-healthcheck agent on a Linux VM.
#
#   curl -fsSL http://SERVER:3000/agents/install.sh | sudo bash -s -- --server URL --token TOKEN
#
# Options: --interval SECONDS (30), --vmid N, --node NAME, --cron (use cron even where systemd
# runs), --root DIR (install into DIR instead of /, for images and tests), --uninstall.
# Running it again updates the agent and its config in place.
set -euo pipefail

server="" token="" interval=30 vmid="" node="" root="" force_cron=0 uninstall=0
while (($#)); do
  case "$1" in
    --server) server="${2:?--server needs a URL}"; shift 2 ;;
    --token) token="${2:?--token needs a value}"; shift 2 ;;
    --interval) interval="${2:?--interval needs seconds}"; shift 2 ;;
    --vmid) vmid="${2:?--vmid needs a number}"; shift 2 ;;
    --node) node="${2:?--node needs a name}"; shift 2 ;;
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --cron) force_cron=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,9p' "$0" 2>/dev/null || true; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

root="${root%/}"
bin="$root/usr/local/bin/vm-healthcheck-agent"
conf_dir="$root/etc/vm-healthcheck"
conf="$conf_dir/agent.conf"
state_dir="$root/var/lib/vm-healthcheck"
unit_dir="$root/etc/systemd/system"
cron_file="$root/etc/cron.d/vm-healthcheck-agent"

say() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [[ -z "$root" && "$(id -u)" -ne 0 ]]; then
  fail "run as root (sudo), or pass --root DIR"
fi

# systemd is used only when it runs this system (not inside a --root image).
use_systemd=0
if [[ -z "$root" && $force_cron -eq 0 && -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  use_systemd=1
fi

if ((uninstall)); then
  if ((use_systemd)); then
    systemctl disable --now vm-healthcheck-agent.timer >/dev/null 2>&1 || true
    rm -f "$unit_dir/vm-healthcheck-agent.service" "$unit_dir/vm-healthcheck-agent.timer"
    systemctl daemon-reload
    say "removed the systemd timer"
  fi
  rm -f "$cron_file" "$bin" "$conf"
  rmdir "$conf_dir" 2>/dev/null || true
  rm -rf "$state_dir"
  say "vm-healthcheck agent uninstalled"
  exit 0
fi

[[ -n "$server" ]] || fail "--server URL is required"
[[ -n "$token" ]] || fail "--token TOKEN is required"
[[ "$interval" =~ ^[0-9]+$ && "$interval" -ge 5 ]] || fail "--interval must be at least 5 seconds"
[[ -z "$vmid" || "$vmid" =~ ^[0-9]+$ ]] || fail "--vmid must be a number"
[[ "$node" =~ ^[A-Za-z0-9-]*$ ]] || fail "--node must be a Proxmox node name"
[[ "$token" =~ ^[A-Za-z0-9._~+/=-]+$ ]] || fail "--token has characters a token cannot have"
server="${server%/}"

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --max-time 30 "$1" -o "$2"
  else
    wget -q -T 30 -O "$2" "$1"
  fi
}

say "downloading the agent from $server"
mkdir -p "$(dirname "$bin")" "$conf_dir" "$state_dir"
tmp="$(mktemp)"
fetch "$server/agents/linux-agent.sh" "$tmp" || fail "could not download $server/agents/linux-agent.sh"
head -1 "$tmp" | grep -q '^#!/usr/bin/env bash' || fail "the server did not send the agent script"
install -m 0755 "$tmp" "$bin"
rm -f "$tmp"
say "installed $bin"

umask 077
cat >"$conf.new" <<CONF
# vm-healthcheck agent configuration (written by install.sh)
SERVER_URL=$server
AGENT_TOKEN=$token
INTERVAL_SECONDS=$interval
VMID=$vmid
NODE=$node
CONF
chmod 600 "$conf.new"
mv "$conf.new" "$conf"
chmod 700 "$conf_dir" "$state_dir"
say "wrote $conf (readable by root only)"

if ((use_systemd)); then
  cat >"$unit_dir/vm-healthcheck-agent.service" <<UNIT
[Unit]
Description=vm-healthcheck agent: one heartbeat
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/vm-healthcheck-agent --tick
Nice=10
UNIT
  cat >"$unit_dir/vm-healthcheck-agent.timer" <<UNIT
[Unit]
Description=vm-healthcheck agent heartbeat every ${interval}s

[Timer]
OnBootSec=15s
OnUnitActiveSec=${interval}s
AccuracySec=1s

[Install]
WantedBy=timers.target
UNIT
  systemctl daemon-reload
  systemctl enable --now vm-healthcheck-agent.timer >/dev/null
  say "enabled vm-healthcheck-agent.timer (every ${interval}s; nothing stays resident between reports)"
else
  mkdir -p "$(dirname "$cron_file")"
  # flock keeps a slow cycle (server unreachable, retries) from overlapping the next one.
  runner="/usr/local/bin/vm-healthcheck-agent --tick"
  if command -v flock >/dev/null 2>&1; then
    runner="flock -n /var/lib/vm-healthcheck/lock $runner"
  fi
  printf '%s\n' "# vm-healthcheck agent (written by install.sh)" \
    "* * * * * root VMHC_CRON=1 $runner >/dev/null 2>&1" >"$cron_file"
  chmod 644 "$cron_file"
  say "wrote $cron_file (cron runs the agent every minute, ${interval}s apart within it)"
fi

say "sending a first report"
if VMHC_AGENT_CONF="$conf" VMHC_STATE_DIR="$state_dir" RETRY_ATTEMPTS=2 "$bin" --once; then
  say "done: this VM now reports to $server"
else
  fail "installed, but the first report was not accepted (see the message above)"
fi
