#!/usr/bin/env bash
# vm-healthcheck Linux agent: sends this VM's CPU, RAM, disk and uptime to the server.
#
#   vm-healthcheck-agent --once   send one report now; exit non-zero if it was not accepted
#   vm-healthcheck-agent --tick   one timer/cron cycle: replay the spool, then send a report
#   vm-healthcheck-agent --run    stay running and report every INTERVAL_SECONDS (systemd service)
#
# Config: /etc/vm-healthcheck/agent.conf (KEY=VALUE lines: SERVER_URL, AGENT_TOKEN,
# INTERVAL_SECONDS, optional VMID and NODE); an environment variable of the same name wins.
# Needs bash, coreutils (or busybox), awk, and curl or wget.
set -uo pipefail

AGENT_VERSION="1.0.0"
CONF_FILE="${VMHC_AGENT_CONF:-/etc/vm-healthcheck/agent.conf}"
STATE_DIR="${VMHC_STATE_DIR:-/var/lib/vm-healthcheck}"
SPOOL_DIR="$STATE_DIR/spool"
SPOOL_MAX="${SPOOL_MAX:-100}"
RETRY_ATTEMPTS="${RETRY_ATTEMPTS:-3}"
RETRY_DELAY_SECONDS="${RETRY_DELAY_SECONDS:-2}"

log() { printf '%s vm-healthcheck-agent: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Reads KEY=VALUE lines without executing the file; the environment overrides each key.
load_config() {
  local key value
  if [[ -r "$CONF_FILE" ]]; then
    while IFS='=' read -r key value; do
      key="${key//[[:space:]]/}"
      [[ -z "$key" || "$key" == \#* ]] && continue
      value="${value%$'\r'}"
      value="${value#\"}"; value="${value%\"}"
      value="${value#\'}"; value="${value%\'}"
      case "$key" in
        SERVER_URL | AGENT_TOKEN | INTERVAL_SECONDS | VMID | NODE)
          # An exported variable of the same name takes precedence over the file.
          if [[ -z "${!key+set}" ]]; then printf -v "$key" '%s' "$value"; fi
          ;;
      esac
    done <"$CONF_FILE"
  fi
  SERVER_URL="${SERVER_URL:-}"
  AGENT_TOKEN="${AGENT_TOKEN:-}"
  INTERVAL_SECONDS="${INTERVAL_SECONDS:-30}"
  VMID="${VMID:-}"
  NODE="${NODE:-}"
  [[ -n "$SERVER_URL" ]] || die "SERVER_URL is not set (in $CONF_FILE or the environment)"
  [[ -n "$AGENT_TOKEN" ]] || die "AGENT_TOKEN is not set (in $CONF_FILE or the environment)"
  [[ "$INTERVAL_SECONDS" =~ ^[0-9]+$ && "$INTERVAL_SECONDS" -ge 1 ]] || die "INTERVAL_SECONDS must be a positive integer"
  [[ -z "$VMID" || "$VMID" =~ ^[0-9]+$ ]] || die "VMID must be a number"
  SERVER_URL="${SERVER_URL%/}"
}

# JSON string literal: escapes backslash, quote and control characters.
json_str() {
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\r'/\\r}"
  s="${s//$'\t'/\\t}"
  s="$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037')"
  printf '"%s"' "$s"
}

# Prints "busy total" jiffies from the first line of /proc/stat.
cpu_sample() {
  awk '/^cpu / { idle = $5 + $6; total = 0; for (i = 2; i <= NF; i++) total += $i; print total - idle, total; exit }' /proc/stat
}

# CPU % since the previous sample (kept in the state dir between timer runs);
# without one, measures over one second.
cpu_percent() {
  local prev_file="$STATE_DIR/cpu.prev" prev now
  now="$(cpu_sample)"
  prev="$(cat "$prev_file" 2>/dev/null || true)"
  if [[ -z "$prev" ]]; then
    prev="$now"
    sleep 1
    now="$(cpu_sample)"
  fi
  { printf '%s\n' "$now" >"$prev_file"; } 2>/dev/null || true
  awk -v p="$prev" -v n="$now" 'BEGIN {
    split(p, a, " "); split(n, b, " ");
    busy = b[1] - a[1]; total = b[2] - a[2];
    pct = (total > 0) ? busy * 100 / total : 0;
    if (pct < 0) pct = 0; if (pct > 100) pct = 100;
    printf "%.1f", pct }'
}

# "used total" in bytes: MemTotal - MemAvailable.
ram_usage() {
  awk '/^MemTotal:/ { t = $2 } /^MemAvailable:/ { a = $2 }
       END { if (a == "") a = 0; printf "%.0f %.0f", (t - a) * 1024, t * 1024 }' /proc/meminfo
}

# JSON array of real filesystems (no tmpfs, overlay, squashfs, network mounts...), one per device.
disks_json() {
  local mounts=() dev mnt fstype
  local -A seen=()
  while read -r dev mnt fstype _; do
    case "$fstype" in
      ext2 | ext3 | ext4 | xfs | btrfs | zfs | f2fs | jfs | reiserfs | vfat | exfat | ntfs | ntfs3 | bcachefs) ;;
      *) continue ;;
    esac
    [[ -n "${seen[$dev]:-}" ]] && continue
    seen[$dev]=1
    mounts+=("$(printf '%b' "$mnt")")
  done </proc/mounts
  if ((${#mounts[@]} == 0)); then
    printf '[]'
    return
  fi
  local first=1 line used total mount
  printf '['
  # -P keeps one line per filesystem; sizes in 1K blocks.
  while read -r line; do
    read -r _ total used _ _ mount <<<"$line"
    [[ "$total" =~ ^[0-9]+$ && "$used" =~ ^[0-9]+$ ]] || continue
    ((first)) || printf ','
    first=0
    # payload:disk:begin
    printf '{"mount":%s,"used_bytes":%s,"total_bytes":%s}' "$(json_str "$mount")" "$((used * 1024))" "$((total * 1024))"
    # payload:disk:end
  done < <(df -P -k "${mounts[@]}" 2>/dev/null | tail -n +2)
  printf ']'
}

machine_id() {
  local uuid
  uuid="$(cat /sys/class/dmi/id/product_uuid 2>/dev/null || true)"
  uuid="$(printf '%s' "$uuid" | tr 'A-F' 'a-f' | tr -d '[:space:]')"
  [[ "$uuid" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] && printf '%s' "$uuid"
}

# Now in RFC 3339 UTC, with milliseconds where date supports %N (GNU; busybox does not).
observed_at() {
  local ms
  ms="$(date -u +%N 2>/dev/null | cut -c1-3)"
  if [[ "$ms" =~ ^[0-9]{3}$ ]]; then
    date -u "+%Y-%m-%dT%H:%M:%S.${ms}Z"
  else
    date -u +%Y-%m-%dT%H:%M:%SZ
  fi
}

# Builds one report as JSON.
build_report() {
  local hostname cpu ram_used ram_total uptime uuid json
  hostname="$(cat /proc/sys/kernel/hostname 2>/dev/null || hostname)"
  cpu="$(cpu_percent)"
  read -r ram_used ram_total <<<"$(ram_usage)"
  uptime="$(awk '{ printf "%d", $1 }' /proc/uptime)"
  uuid="$(machine_id || true)"
  # payload:begin
  json="{\"hostname\":$(json_str "$hostname"),\"os\":\"linux\""
  [[ -n "$uuid" ]] && json+=",\"machine_id\":$(json_str "$uuid")"
  [[ -n "$VMID" ]] && json+=",\"vmid\":$VMID"
  [[ -n "$NODE" ]] && json+=",\"node\":$(json_str "$NODE")"
  json+=",\"cpu_percent\":$cpu,\"ram_used_bytes\":$ram_used,\"ram_total_bytes\":$ram_total"
  json+=",\"disks\":$(disks_json),\"uptime_seconds\":$uptime"
  json+=",\"agent_version\":$(json_str "$AGENT_VERSION")"
  json+=",\"observed_at\":$(json_str "$(observed_at)")}"
  # payload:end
  printf '%s' "$json"
}

# POSTs the JSON file $1; prints the HTTP status (000 when unreachable) and leaves the body in $2.
# The token goes through a config file or stdin, never the command line (visible in ps).
post_report() {
  local body_file="$1" response_file="$2" code
  if command -v curl >/dev/null 2>&1; then
    code="$(printf 'header = "Authorization: Bearer %s"\n' "$AGENT_TOKEN" |
      curl -sS -K - -o "$response_file" -w '%{http_code}' --connect-timeout 5 --max-time 15 \
        -H 'Content-Type: application/json' --data-binary "@$body_file" \
        "$SERVER_URL/api/health/report" 2>/dev/null)" || true
    printf '%s' "${code:-000}"
  elif wget --version 2>/dev/null | grep -q 'GNU Wget'; then
    local rc headers
    rc="$(mktemp)"
    printf 'header = Authorization: Bearer %s\n' "$AGENT_TOKEN" >"$rc"
    headers="$(WGETRC="$rc" wget -q -S -O "$response_file" --content-on-error --timeout=15 --tries=1 \
      --header='Content-Type: application/json' --post-file="$body_file" \
      "$SERVER_URL/api/health/report" 2>&1)" || true
    rm -f "$rc"
    code="$(printf '%s\n' "$headers" | awk '/^  HTTP\// { c = $2 } END { print c }')"
    printf '%s' "${code:-000}"
  else
    # busybox wget: no config file, so the header is on its command line.
    wget -q -O "$response_file" -T 15 --header "Authorization: Bearer $AGENT_TOKEN" \
      --header 'Content-Type: application/json' --post-file="$body_file" \
      "$SERVER_URL/api/health/report" 2>/dev/null && printf '200' || printf '000'
  fi
}

error_message() {
  sed -n 's/.*"error":"\([^"]*\)".*/\1/p' "$1" 2>/dev/null | head -c 300
}

# Sends the JSON file $1 with retries on transient failures.
# Returns 0 when accepted, 2 when refused for good (4xx but 429), 1 when the server is
# unreachable or failing (worth keeping in the spool).
send_file() {
  local file="$1" response code attempt=1 delay="$RETRY_DELAY_SECONDS"
  response="$(mktemp)"
  while :; do
    code="$(post_report "$file" "$response")"
    case "$code" in
      2??) rm -f "$response"; return 0 ;;
      401 | 403)
        log "the server rejected the agent token (HTTP $code): check AGENT_TOKEN in $CONF_FILE"
        rm -f "$response"; return 2 ;;
      429 | 000 | 5??) ;;
      4??)
        log "report refused (HTTP $code): $(error_message "$response")"
        rm -f "$response"; return 2 ;;
    esac
    if ((attempt >= RETRY_ATTEMPTS)); then
      if [[ "$code" == 000 ]]; then
        log "server $SERVER_URL unreachable"
      else
        log "server answered HTTP $code: $(error_message "$response")"
      fi
      rm -f "$response"; return 1
    fi
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

# Keeps a report for later, dropping the oldest beyond SPOOL_MAX.
spool() {
  mkdir -p "$SPOOL_DIR" && chmod 700 "$SPOOL_DIR"
  local name
  name="$SPOOL_DIR/$(date +%s%N)-$$.json"
  cp "$1" "$name"
  local files=("$SPOOL_DIR"/*.json)
  local excess=$((${#files[@]} - SPOOL_MAX))
  local i
  for ((i = 0; i < excess; i++)); do rm -f "${files[$i]}"; done
}

# Sends spooled reports oldest first; stops at the first that cannot be delivered yet.
replay_spool() {
  [[ -d "$SPOOL_DIR" ]] || return 0
  local file result
  for file in "$SPOOL_DIR"/*.json; do
    [[ -e "$file" ]] || return 0
    send_file "$file"
    result=$?
    case "$result" in
      0 | 2) rm -f "$file" ;;
      *) return 1 ;;
    esac
  done
}

# One cycle: replay what is spooled, then report now (or spool it).
cycle() {
  local report result=0
  report="$(mktemp)"
  build_report >"$report"
  if replay_spool; then
    send_file "$report"
    result=$?
    [[ $result -eq 1 ]] && spool "$report"
  else
    spool "$report"
    result=1
  fi
  rm -f "$report"
  return "$result"
}

main() {
  local mode="${1:---run}"
  umask 077
  mkdir -p "$STATE_DIR" 2>/dev/null || die "cannot create $STATE_DIR"
  load_config
  case "$mode" in
    --once)
      if cycle; then
        echo "report accepted by $SERVER_URL"
      else
        die "report not accepted by $SERVER_URL (kept in $SPOOL_DIR when the server was unreachable)"
      fi
      ;;
    --tick)
      # Under cron, whose finest step is a minute, a short interval means several cycles.
      local runs=1 i
      if [[ "${VMHC_CRON:-}" == 1 ]] && ((INTERVAL_SECONDS < 60)); then runs=$((60 / INTERVAL_SECONDS)); fi
      for ((i = 1; i <= runs; i++)); do
        cycle || true
        if ((i < runs)); then sleep "$INTERVAL_SECONDS"; fi
      done
      # A tick always succeeds: undelivered reports wait in the spool.
      return 0
      ;;
    --run)
      log "reporting to $SERVER_URL every ${INTERVAL_SECONDS}s"
      while :; do
        cycle || true
        sleep "$INTERVAL_SECONDS"
      done
      ;;
    --version) echo "$AGENT_VERSION" ;;
    *) die "usage: $0 [--once | --tick | --run | --version]" ;;
  esac
}

main "$@"
