#!/usr/bin/env bash
# Installs (or removes) the vm-healthcheck agent on a Linux VM.
#
#   curl -fsSLO https://SERVER/agents/install.sh
#   sudo bash install.sh --server https://SERVER --token-file FILE [--sha256 HEX]
#
# The token: --token-file FILE (its first line), --token-stdin (when this script is not
# itself read from standard input), or --token TOKEN (visible to local users in ps and kept
# in shell history: avoid). It only enrols: the server answers the first report with this
# VM's own credential, which the agent keeps and sends from then on.
# Options: --interval SECONDS (30), --vmid N, --node NAME, --cron (use cron even where systemd
# runs), --root DIR (install into DIR instead of /, for images and tests), --sha256 HEX (the
# agent script's expected SHA-256: refuse to install anything else), --ca-file FILE (CA or
# self-signed certificate to trust), --pinned-pubkey sha256//BASE64 (the server key to
# trust), --insecure (allow an http:// server: token and credential cross the network in
# clear), --uninstall. Running it again updates the agent and its config in place.
set -euo pipefail

server="" token="" token_source="" interval=30 vmid="" node="" root="" force_cron=0 uninstall=0
insecure=0 sha256="" ca_file="" pinned_pubkey="" token_sources=0
while (($#)); do
  case "$1" in
    --server) server="${2:?--server needs a URL}"; shift 2 ;;
    --token) token="${2:?--token needs a value}"; token_source=argv; token_sources=$((token_sources + 1)); shift 2 ;;
    --token-file) token_source="file:${2:?--token-file needs a file}"; token_sources=$((token_sources + 1)); shift 2 ;;
    --token-stdin) token_source=stdin; token_sources=$((token_sources + 1)); shift ;;
    --interval) interval="${2:?--interval needs seconds}"; shift 2 ;;
    --vmid) vmid="${2:?--vmid needs a number}"; shift 2 ;;
    --node) node="${2:?--node needs a name}"; shift 2 ;;
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --sha256) sha256="${2:?--sha256 needs the SHA-256 of linux-agent.sh}"; shift 2 ;;
    --ca-file) ca_file="${2:?--ca-file needs a file}"; shift 2 ;;
    --pinned-pubkey) pinned_pubkey="${2:?--pinned-pubkey needs sha256//BASE64}"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --cron) force_cron=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,16p' "$0" 2>/dev/null || true; exit 0 ;;
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
  rm -f "$cron_file" "$bin" "$conf" "$conf_dir/credential" "$conf_dir"/.credential.*
  rmdir "$conf_dir" 2>/dev/null || true
  rm -rf "$state_dir"
  say "vm-healthcheck agent uninstalled"
  exit 0
fi

[[ -n "$server" ]] || fail "--server URL is required"
server="${server%/}"
case "$server" in
  https://*) ;;
  http://*)
    ((insecure)) || fail "refusing the http:// server $server: the agent token and this VM's credential would cross the network in clear. Use https:// (for example the server behind a TLS reverse proxy), or pass --insecure to accept that"
    ;;
  *) fail "--server must be an https:// URL (or http:// with --insecure)" ;;
esac
((token_sources <= 1)) || fail "give the token once: --token-file FILE, --token-stdin or --token TOKEN"
case "$token_source" in
  "") fail "the agent token is required: --token-file FILE or --token-stdin" ;;
  argv)
    printf '%s\n' "install.sh: warning: --token puts the token on the command line, where every local user sees it in ps and shell history keeps it; use --token-file FILE or --token-stdin instead" >&2
    ;;
  stdin)
    # Piped into bash, this script is itself standard input: reading would eat its own text.
    ((${#BASH_SOURCE[@]} > 0)) ||
      fail "--token-stdin needs this script saved to a file (here it is read from standard input itself): download install.sh, then run: bash install.sh ... --token-stdin, or use --token-file FILE"
    IFS= read -r token || [[ -n "$token" ]] || fail "no token on standard input"
    ;;
  file:*)
    token_file="${token_source#file:}"
    [[ -r "$token_file" ]] || fail "cannot read the token file $token_file"
    IFS= read -r token <"$token_file" || [[ -n "$token" ]] || fail "the token file $token_file is empty"
    ;;
esac
token="${token%$'\r'}"
token="${token//[[:space:]]/}"
[[ -n "$token" ]] || fail "the agent token is empty"
[[ "$token" =~ ^[A-Za-z0-9._~+/=-]+$ ]] || fail "the token has characters a token cannot have"
[[ "$interval" =~ ^[0-9]+$ && "$interval" -ge 5 ]] || fail "--interval must be at least 5 seconds"
[[ -z "$vmid" || "$vmid" =~ ^[0-9]+$ ]] || fail "--vmid must be a number"
[[ "$node" =~ ^[A-Za-z0-9-]*$ ]] || fail "--node must be a Proxmox node name"
if [[ -n "$sha256" ]]; then
  sha256="${sha256,,}"
  [[ "$sha256" =~ ^[0-9a-f]{64}$ ]] || fail "--sha256 must be 64 hex digits (the SHA-256 of linux-agent.sh)"
  command -v sha256sum >/dev/null 2>&1 || fail "--sha256 needs sha256sum (coreutils or busybox)"
fi
if [[ -n "$ca_file" ]]; then
  [[ "$ca_file" == /* ]] || fail "--ca-file needs an absolute path"
  [[ -r "$ca_file" ]] || fail "cannot read the CA file $ca_file"
fi
if [[ -n "$pinned_pubkey" ]]; then
  [[ "$pinned_pubkey" == sha256//* ]] || pinned_pubkey="sha256//$pinned_pubkey"
  [[ "$pinned_pubkey" =~ ^sha256//[A-Za-z0-9+/]{43}=(\;sha256//[A-Za-z0-9+/]{43}=)*$ ]] ||
    fail "--pinned-pubkey must be sha256// and the base64 SHA-256 of the server's public key"
fi
have_curl=0
command -v curl >/dev/null 2>&1 && have_curl=1
if [[ "$server" == https://* ]] && ((!have_curl)); then
  [[ -z "$pinned_pubkey" ]] || fail "--pinned-pubkey needs curl: install curl"
  wget --version 2>/dev/null | grep -q 'GNU Wget' ||
    fail "https:// without curl needs GNU wget (busybox wget would put the token on its command line, where local users see it): install curl (Alpine: apk add curl)"
fi

umask 077
tmp=""
trap 'rm -f "$tmp"' EXIT

fetch() {
  local tls=()
  if ((have_curl)); then
    if [[ -n "$ca_file" ]]; then tls+=(--cacert "$ca_file"); fi
    if [[ -n "$pinned_pubkey" ]]; then
      # The pinned key is the trust (a self-signed certificate has no chain to check).
      tls+=(--pinnedpubkey "$pinned_pubkey")
      if [[ -z "$ca_file" ]]; then tls+=(--insecure); fi
    fi
    curl -fsSL --proto '=http,https' --max-time 30 "${tls[@]}" "$1" -o "$2"
  else
    if [[ -n "$ca_file" ]]; then tls+=("--ca-certificate=$ca_file"); fi
    wget -q -T 30 "${tls[@]}" -O "$2" "$1"
  fi
}

# Downloaded and checked before anything is installed.
say "downloading the agent from $server"
tmp="$(mktemp)"
fetch "$server/agents/linux-agent.sh" "$tmp" || fail "could not download $server/agents/linux-agent.sh"
head -1 "$tmp" | grep -q '^#!/usr/bin/env bash' || fail "the server did not send the agent script"
if [[ -n "$sha256" ]]; then
  read -r actual _ < <(sha256sum "$tmp")
  [[ "$actual" == "$sha256" ]] ||
    fail "the agent script's SHA-256 is $actual, not $sha256 as --sha256 says: nothing installed"
  say "the agent script's SHA-256 matches"
fi
mkdir -p "$(dirname "$bin")" "$conf_dir" "$state_dir"
install -m 0755 "$tmp" "$bin"
rm -f "$tmp"
say "installed $bin"

insecure_value=false
((insecure)) && insecure_value=true
cat >"$conf.new" <<CONF
# vm-healthcheck agent configuration (written by install.sh)
SERVER_URL=$server
AGENT_TOKEN=$token
INTERVAL_SECONDS=$interval
VMID=$vmid
NODE=$node
INSECURE=$insecure_value
CA_FILE=$ca_file
PINNED_PUBKEY=$pinned_pubkey
CONF
chmod 600 "$conf.new"
mv "$conf.new" "$conf"
chmod 700 "$conf_dir" "$state_dir"
say "wrote $conf (readable by root only)"
if [[ -e "$conf_dir/credential" ]]; then
  say "kept this VM's credential ($conf_dir/credential); vm-healthcheck-agent --enrol enrols it again with the token"
fi

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
