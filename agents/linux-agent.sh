#!/usr/bin/env bash
# vm-healthcheck Linux agent: sends this VM's CPU, RAM, disk and uptime to the server.
#
#   vm-healthcheck-agent --once   send one report now; exit non-zero if it was not accepted
#   vm-healthcheck-agent --tick   one timer/cron cycle: replay the spool, then send a report
#   vm-healthcheck-agent --run    stay running and report every INTERVAL_SECONDS (systemd service)
#   vm-healthcheck-agent --enrol  forget this VM's credential and enrol again with AGENT_TOKEN
#   vm-healthcheck-agent --set-credential   store a new credential read from standard input
#
# Config: /etc/vm-healthcheck/agent.conf (KEY=VALUE lines: SERVER_URL, AGENT_TOKEN,
# INTERVAL_SECONDS, optional VMID, NODE, CREDENTIAL_FILE, INSECURE, CA_FILE, PINNED_PUBKEY);
# an environment variable of the same name wins.
# AGENT_TOKEN only enrols: the server answers the first accepted report with this VM's own
# credential, kept in CREDENTIAL_FILE (default: "credential" beside agent.conf) and sent
# instead of the token from then on.
# Needs bash, coreutils (or busybox), awk, and curl (or GNU wget; for http:// bash alone).
set -uo pipefail

AGENT_VERSION="1.0.0"
CONF_FILE="${VMHC_AGENT_CONF:-/etc/vm-healthcheck/agent.conf}"
STATE_DIR="${VMHC_STATE_DIR:-/var/lib/vm-healthcheck}"
SPOOL_DIR="$STATE_DIR/spool"
SPOOL_MAX="${SPOOL_MAX:-100}"
# The server keeps at most this many filesystems of one report.
MAX_DISKS=64
RETRY_ATTEMPTS="${RETRY_ATTEMPTS:-3}"
RETRY_DELAY_SECONDS="${RETRY_DELAY_SECONDS:-2}"
# What the server's credentials look like; nothing else is stored or sent as one.
CREDENTIAL_PATTERN='^vmhc_vm_[0-9a-f]{64}$'
WGET_KIND=""

log() { TZ=UTC0 printf '%(%Y-%m-%dT%H:%M:%S)TZ vm-healthcheck-agent: %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Reads KEY=VALUE lines without executing the file; the environment overrides each key.
load_config() {
  local line key value
  if [[ -r "$CONF_FILE" ]]; then
    while IFS= read -r line || [[ -n "$line" ]]; do
      # Split at the first "=" only: values may end in "=" (base64 tokens and pins).
      [[ "$line" == *=* ]] || continue
      key="${line%%=*}" value="${line#*=}"
      key="${key//[[:space:]]/}"
      [[ -z "$key" || "$key" == \#* ]] && continue
      value="${value%$'\r'}"
      value="${value#"${value%%[![:space:]]*}"}"; value="${value%"${value##*[![:space:]]}"}"
      value="${value#\"}"; value="${value%\"}"
      value="${value#\'}"; value="${value%\'}"
      case "$key" in
        SERVER_URL | AGENT_TOKEN | INTERVAL_SECONDS | VMID | NODE | CREDENTIAL_FILE | INSECURE | CA_FILE | PINNED_PUBKEY)
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
  INSECURE="${INSECURE:-false}"
  CA_FILE="${CA_FILE:-}"
  PINNED_PUBKEY="${PINNED_PUBKEY:-}"
  # By default the credential lives beside agent.conf (so an image installed with
  # install.sh --root keeps both in the same place).
  if [[ -z "${CREDENTIAL_FILE:-}" ]]; then
    if [[ "$CONF_FILE" == */* ]]; then CREDENTIAL_FILE="${CONF_FILE%/*}/credential"; else CREDENTIAL_FILE=credential; fi
  fi
}

# Checks what sending a report needs: the server's address, how to reach it safely, and
# the interval. Nothing has been sent when this refuses.
check_server_config() {
  [[ -n "$SERVER_URL" ]] || die "SERVER_URL is not set (in $CONF_FILE or the environment)"
  [[ "$INTERVAL_SECONDS" =~ ^[0-9]+$ && "$INTERVAL_SECONDS" -ge 1 ]] || die "INTERVAL_SECONDS must be a positive integer"
  [[ -z "$VMID" || "$VMID" =~ ^[0-9]+$ ]] || die "VMID must be a number"
  SERVER_URL="${SERVER_URL%/}"
  case "$SERVER_URL" in
    https://*) ;;
    http://*)
      # The token and this VM's credential would cross the network in clear.
      [[ "$INSECURE" == true ]] ||
        die "refusing to report to $SERVER_URL: over http:// the agent token and this VM's credential cross the network in clear; use https:// (for example behind a TLS reverse proxy), or set INSECURE=true in $CONF_FILE to accept that"
      ;;
    *) die "SERVER_URL must start with https:// (or http:// with INSECURE=true): $SERVER_URL" ;;
  esac
  if [[ -n "$CA_FILE" && ! -r "$CA_FILE" ]]; then die "CA_FILE $CA_FILE cannot be read"; fi
  if [[ -n "$PINNED_PUBKEY" ]]; then
    # curl's form; a bare base64 SHA-256 of the public key is taken as such.
    [[ "$PINNED_PUBKEY" == sha256//* ]] || PINNED_PUBKEY="sha256//$PINNED_PUBKEY"
    [[ "$PINNED_PUBKEY" =~ ^sha256//[A-Za-z0-9+/]{43}=(\;sha256//[A-Za-z0-9+/]{43}=)*$ ]] ||
      die "PINNED_PUBKEY must be sha256// and the base64 SHA-256 of the server's public key (44 characters)"
  fi
  if [[ "$SERVER_URL" == https://* ]] && ! command -v curl >/dev/null 2>&1; then
    [[ -z "$PINNED_PUBKEY" ]] || die "PINNED_PUBKEY needs curl (wget cannot pin a key): install curl"
    gnu_wget ||
      die "https:// without curl needs GNU wget: busybox wget can only take the token or credential on its command line, where every local user sees it; install curl (Alpine: apk add curl)"
  fi
}

# Sets AUTH_KIND and AUTH_SECRET: this VM's credential when it has one (never falling back
# to the token), else the enrolment token.
load_auth() {
  local LC_ALL=C
  if [[ -e "$CREDENTIAL_FILE" ]]; then
    local credential=""
    [[ -r "$CREDENTIAL_FILE" ]] || die "cannot read this VM's credential in $CREDENTIAL_FILE"
    read -r credential <"$CREDENTIAL_FILE" || true
    [[ "$credential" =~ $CREDENTIAL_PATTERN ]] ||
      die "$CREDENTIAL_FILE holds no credential: store one with \`vm-healthcheck-agent --set-credential\` or enrol again with \`vm-healthcheck-agent --enrol\`"
    AUTH_KIND=credential
    AUTH_SECRET="$credential"
  else
    [[ -n "$AGENT_TOKEN" ]] || die "AGENT_TOKEN is not set (in $CONF_FILE or the environment) and this VM has no credential ($CREDENTIAL_FILE)"
    # It goes into an HTTP header and curl's config: printable, no quote or backslash.
    [[ "$AGENT_TOKEN" =~ ^[!-~]+$ && "$AGENT_TOKEN" != *[\"\\]* ]] ||
      die "AGENT_TOKEN has characters a token cannot have"
    AUTH_KIND=token
    AUTH_SECRET="$AGENT_TOKEN"
  fi
}

# Writes this VM's credential $1 to CREDENTIAL_FILE atomically: a temporary file created
# 0600 beside it, then renamed over it, so it is never readable by others, not even briefly.
store_credential() {
  local credential="$1" dir tmp
  [[ "$credential" =~ $CREDENTIAL_PATTERN ]] || return 1
  dir="."
  [[ "$CREDENTIAL_FILE" == */* ]] && dir="${CREDENTIAL_FILE%/*}"
  [[ -d "$dir" ]] || mkdir -p "$dir" || return 1
  tmp="$(umask 077 && mktemp "$dir/.credential.XXXXXXXX")" || return 1
  if chmod 600 "$tmp" && printf '%s\n' "$credential" >"$tmp" && mv -f "$tmp" "$CREDENTIAL_FILE"; then
    return 0
  fi
  rm -f "$tmp"
  return 1
}

# True when wget is GNU Wget (which reads headers from a wgetrc), not busybox's.
gnu_wget() {
  if [[ -z "$WGET_KIND" ]]; then
    WGET_KIND=other
    if wget --version 2>/dev/null | grep -q 'GNU Wget'; then WGET_KIND=gnu; fi
  fi
  [[ "$WGET_KIND" == gnu ]]
}

# Collection uses bash builtins wherever it can: every fork costs CPU on each report.

# Sets REPLY to the JSON string literal of $1 (backslash, quote and control characters escaped).
json_str() {
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\r'/\\r}"
  s="${s//$'\t'/\\t}"
  local LC_ALL=C
  s="${s//[$'\001'-$'\037']/}"
  REPLY="\"$s\""
}

# Sets CPU_BUSY and CPU_TOTAL from the first line of /proc/stat (jiffies).
cpu_sample() {
  local user nice system idle iowait irq softirq steal
  read -r _ user nice system idle iowait irq softirq steal _ </proc/stat
  CPU_TOTAL=$((user + nice + system + idle + iowait + irq + softirq + ${steal:-0}))
  CPU_BUSY=$((CPU_TOTAL - idle - iowait))
}

# Sets CPU to the busy % since the previous sample (kept in the state dir between timer
# runs), one decimal; without a previous sample, measures over one second.
cpu_percent() {
  local prev_file="$STATE_DIR/cpu.prev" prev_busy="" prev_total=""
  if [[ -r "$prev_file" ]]; then read -r prev_busy prev_total <"$prev_file" || true; fi
  cpu_sample
  # Too short a window (or none) says little: measure over one second instead.
  if [[ ! "$prev_busy" =~ ^[0-9]+$ || ! "$prev_total" =~ ^[0-9]+$ ]] || ((prev_total + 100 > CPU_TOTAL)); then
    prev_busy=$CPU_BUSY prev_total=$CPU_TOTAL
    sleep 1
    cpu_sample
  fi
  { printf '%s %s\n' "$CPU_BUSY" "$CPU_TOTAL" >"$prev_file"; } 2>/dev/null || true
  local busy=$((CPU_BUSY - prev_busy)) total=$((CPU_TOTAL - prev_total)) tenths=0
  ((total > 0)) && tenths=$((busy * 1000 / total))
  ((tenths < 0)) && tenths=0
  ((tenths > 1000)) && tenths=1000
  CPU="$((tenths / 10)).$((tenths % 10))"
}

# Sets RAM_USED and RAM_TOTAL in bytes: MemTotal - MemAvailable.
ram_usage() {
  local key value _ total=0 available=0
  while read -r key value _; do
    case "$key" in
      MemTotal:) total=$value ;;
      MemAvailable:) available=$value ;;
    esac
  done </proc/meminfo
  RAM_TOTAL=$((total * 1024))
  RAM_USED=$(((total - available) * 1024))
}

# Sets DISKS to a JSON array of real filesystems (no tmpfs, overlay, squashfs, network
# mounts...), one per device.
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
    # /proc/mounts escapes spaces and the like as octal (\040).
    printf -v mnt '%b' "$mnt"
    mounts+=("$mnt")
  done </proc/mounts
  # Each entry is "<permille full> <json>", so the fullest can be kept when there are many.
  local entries=()
  if ((${#mounts[@]} > 0)); then
    local header=1 used total mount
    # -P keeps one line per filesystem; sizes in 1K blocks.
    while read -r _ total used _ _ mount; do
      if ((header)); then header=0 && continue; fi
      [[ "$total" =~ ^[0-9]+$ && "$used" =~ ^[0-9]+$ ]] || continue
      # The server drops mount names over 1024 bytes; so does the agent.
      ((${#mount} <= 1024)) || continue
      json_str "$mount"
      # payload:disk:begin
      entries+=("$((total > 0 ? used * 1000 / total : 0)) {\"mount\":$REPLY,\"used_bytes\":$((used * 1024)),\"total_bytes\":$((total * 1024))}")
      # payload:disk:end
    done < <(df -P -k "${mounts[@]}" 2>/dev/null)
  fi
  if ((${#entries[@]} > MAX_DISKS)); then
    # ZFS mounts every dataset: send the fullest, as many as the server keeps.
    mapfile -t entries < <(printf '%s\n' "${entries[@]}" | sort -rn | head -n "$MAX_DISKS")
  fi
  local entry
  DISKS="["
  for entry in "${entries[@]}"; do
    [[ $DISKS == "[" ]] || DISKS+=","
    DISKS+="${entry#* }"
  done
  DISKS+="]"
}

# Sets MACHINE_ID to the SMBIOS uuid in lower case, or empty (the file is root-only).
machine_id() {
  MACHINE_ID=""
  local uuid=""
  if [[ -r /sys/class/dmi/id/product_uuid ]]; then
    read -r uuid </sys/class/dmi/id/product_uuid || true
  fi
  uuid="${uuid,,}"
  [[ "$uuid" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] && MACHINE_ID="$uuid"
  return 0
}

# Sets OBSERVED_AT to now in RFC 3339 UTC: with milliseconds from bash 5's EPOCHREALTIME,
# else whole seconds.
observed_at() {
  local now="${EPOCHREALTIME:-}" seconds fraction
  if [[ "$now" =~ ^([0-9]+)[.,]([0-9]{3}) ]]; then
    seconds="${BASH_REMATCH[1]}" fraction="${BASH_REMATCH[2]}"
    TZ=UTC0 printf -v OBSERVED_AT "%(%Y-%m-%dT%H:%M:%S)T.${fraction}Z" "$seconds"
  else
    TZ=UTC0 printf -v OBSERVED_AT '%(%Y-%m-%dT%H:%M:%S)TZ' -1
  fi
}

# Sets REPORT to one report as JSON.
build_report() {
  local hostname="" uptime=""
  read -r hostname </proc/sys/kernel/hostname || hostname="${HOSTNAME:-unknown}"
  cpu_percent
  ram_usage
  read -r uptime _ </proc/uptime
  uptime="${uptime%%.*}"
  machine_id
  disks_json
  observed_at
  # payload:begin
  json_str "$hostname"
  REPORT="{\"hostname\":$REPLY,\"os\":\"linux\""
  if [[ -n "$MACHINE_ID" ]]; then json_str "$MACHINE_ID" && REPORT+=",\"machine_id\":$REPLY"; fi
  if [[ -n "$VMID" ]]; then REPORT+=",\"vmid\":$VMID"; fi
  if [[ -n "$NODE" ]]; then json_str "$NODE" && REPORT+=",\"node\":$REPLY"; fi
  REPORT+=",\"cpu_percent\":$CPU,\"ram_used_bytes\":$RAM_USED,\"ram_total_bytes\":$RAM_TOTAL"
  REPORT+=",\"disks\":$DISKS,\"uptime_seconds\":$uptime"
  json_str "$AGENT_VERSION"
  REPORT+=",\"agent_version\":$REPLY"
  json_str "$OBSERVED_AT"
  REPORT+=",\"observed_at\":$REPLY}"
  # payload:end
}

# POSTs the JSON file $1 over plain HTTP with bash's /dev/tcp: no process at all, which is
# most of a report's cost. It has no connect timeout, so it is used only while the server
# answers (see send_file); anything else goes through curl or wget.
post_builtin() {
  local body_file="$1" response_file="$2" host port prefix body fd proto code line
  HTTP_CODE=000
  [[ "$SERVER_URL" =~ ^http://([A-Za-z0-9._-]+)(:([0-9]+))?(/.*)?$ ]] || return 1
  host="${BASH_REMATCH[1]}" port="${BASH_REMATCH[3]:-80}" prefix="${BASH_REMATCH[4]}"
  IFS= read -r body <"$body_file" || [[ -n "$body" ]] || return 1
  # Braces keep the 2>/dev/null to this line (on exec itself it would silence the shell).
  { exec {fd}<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 0
  local LC_ALL=C # so ${#body} counts bytes
  printf 'POST %s/api/health/report HTTP/1.1\r\nHost: %s:%s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$prefix" "$host" "$port" "$AUTH_SECRET" "${#body}" "$body" 1>&"$fd"
  if IFS=' ' read -r -t 15 proto code _ <&"$fd" && [[ "$proto" == HTTP/1.* && "$code" =~ ^[0-9]{3}$ ]]; then
    # Skip the headers; keep the body for error messages and the credential.
    while IFS= read -r -t 15 line <&"$fd" && [[ "$line" != $'\r' && -n "$line" ]]; do :; done
    line=""
    IFS= read -r -t 15 -d '' line <&"$fd" || true
    printf '%s' "$line" >"$response_file"
    HTTP_CODE="$code"
  fi
  exec {fd}>&-
}

# post_builtin with a deadline, for machines with neither curl nor GNU wget: it runs in a
# forked subshell (which sees the secret without it ever being on a command line) that is
# killed if it has not answered in time.
post_builtin_bounded() {
  local out pid code=""
  exec {out}< <(post_builtin "$1" "$2"; printf '%s\n' "$HTTP_CODE")
  pid=$!
  if ! IFS= read -r -t 30 -u "$out" code; then kill "$pid" 2>/dev/null; fi
  exec {out}<&-
  [[ "$code" =~ ^[0-9]{3}$ ]] || code=000
  HTTP_CODE="$code"
}

# POSTs the JSON file $1; sets HTTP_CODE (000 when unreachable) and leaves the body in $2;
# sets UNTRUSTED when the server's certificate failed verification or the pinned key.
# The token or credential goes through a config file or stdin, never a command line
# (visible to every local user in ps).
post_report() {
  local body_file="$1" response_file="$2" code rc=0
  UNTRUSTED=""
  if command -v curl >/dev/null 2>&1; then
    local tls=()
    if [[ -n "$CA_FILE" ]]; then tls+=(--cacert "$CA_FILE"); fi
    if [[ -n "$PINNED_PUBKEY" ]]; then
      tls+=(--pinnedpubkey "$PINNED_PUBKEY")
      # The pinned key is the trust: a self-signed certificate has no chain to check.
      # curl still refuses any other key before sending anything.
      if [[ -z "$CA_FILE" ]]; then tls+=(--insecure); fi
    fi
    # The here-string feeds the header through stdin; output goes to files, so no subshell.
    local code_file="$STATE_DIR/http-status"
    curl -sS -K - -o "$response_file" -w '%{http_code}' --connect-timeout 5 --max-time 15 \
      --proto '=http,https' "${tls[@]}" \
      -H 'Content-Type: application/json' --data-binary "@$body_file" \
      "$SERVER_URL/api/health/report" <<<"header = \"Authorization: Bearer $AUTH_SECRET\"" \
      >"$code_file" 2>/dev/null || rc=$?
    code=""
    read -r code <"$code_file" || true
    HTTP_CODE="${code:-000}"
    # Peer verification, CA file, issuer check, pinned key (curl's exit codes).
    case "$rc" in 51 | 60 | 77 | 83 | 90) UNTRUSTED="curl exit code $rc" ;; esac
  elif gnu_wget; then
    local headers tls=()
    if [[ -n "$CA_FILE" ]]; then tls+=("--ca-certificate=$CA_FILE"); fi
    local wgetrc
    wgetrc="$(mktemp)"
    printf 'header = Authorization: Bearer %s\n' "$AUTH_SECRET" >"$wgetrc"
    headers="$(WGETRC="$wgetrc" wget -q -S -O "$response_file" --content-on-error --timeout=15 --tries=1 \
      "${tls[@]}" --header='Content-Type: application/json' --post-file="$body_file" \
      "$SERVER_URL/api/health/report" 2>&1)" || rc=$?
    rm -f "$wgetrc"
    code="$(printf '%s\n' "$headers" | awk '/^  HTTP\// { c = $2 } END { print c }')"
    HTTP_CODE="${code:-000}"
    # wget's exit status for a failed certificate check.
    if [[ "$rc" == 5 ]]; then UNTRUSTED="wget exit status 5"; fi
  else
    # busybox wget can only take a header on its command line, where every local user
    # sees it: http:// goes through bash itself, and https:// was refused at start-up.
    : >"$response_file"
    post_builtin_bounded "$body_file" "$response_file"
  fi
}

# The server's reason from an error body, {"error":{"code","message","field"?}}, as
# "field: message"; servers before that shape sent {"error":"message"}.
error_message() {
  local message field
  message=$(sed -n 's/.*"message":"\([^"]*\)".*/\1/p' "$1" 2>/dev/null)
  field=$(sed -n 's/.*"field":"\([^"]*\)".*/\1/p' "$1" 2>/dev/null)
  [ -n "$message" ] || message=$(sed -n 's/.*"error":"\([^"]*\)".*/\1/p' "$1" 2>/dev/null)
  if [ -n "$field" ]; then message="$field: $message"; fi
  printf '%s' "$message" | head -c 300
}

# Reads an accepted report's answer in $1: logs the server's warnings, and keeps the
# credential an enrolment answer carries. Returns 1 when that credential could not be kept.
accepted() {
  local body="" warnings item
  local json_string='"(([^"\\]|\\.)*)"'
  local warnings_array='"warnings"[[:space:]]*:[[:space:]]*\[(("([^"\\]|\\.)*"|[[:space:],])*)\]'
  local credential_member='"credential"[[:space:]]*:[[:space:]]*"([^"]*)"'
  [[ -s "$1" ]] || return 0
  IFS= read -r -d '' body <"$1" || true
  if [[ "$body" =~ $warnings_array ]]; then
    warnings="${BASH_REMATCH[1]}"
    while [[ "$warnings" =~ $json_string ]]; do
      item="${BASH_REMATCH[1]}"
      item="${item//\\\"/\"}"
      warnings="${warnings#*"${BASH_REMATCH[0]}"}"
      log "warning from the server: ${item:0:300}"
    done
  fi
  if [[ "$AUTH_KIND" == token && "$body" =~ $credential_member ]]; then
    local credential="${BASH_REMATCH[1]}"
    # Not left lying in the scratch answer file.
    : >"$1"
    if ! store_credential "$credential"; then
      log "error: the server enrolled this VM but its credential could not be stored in $CREDENTIAL_FILE; fix that, then ask the admin for a new credential (\`vm-healthcheck-agent --set-credential\`) or re-enrol with \`vm-healthcheck-agent --enrol\`"
      return 1
    fi
    AUTH_KIND=credential
    AUTH_SECRET="$credential"
    log "enrolled: this VM's own credential is in $CREDENTIAL_FILE and replaces the agent token"
  fi
  return 0
}

# Sends the JSON file $1 with retries on transient failures. Returns
#   0 accepted;
#   1 the server is unreachable or failing (worth keeping in the spool);
#   2 refused for good (4xx but 429, or a wrong enrolment token): dropped;
#   3 this VM's credential was rejected, or its identity is enrolled by another credential:
#     nothing more can be sent until an admin acts, so the cycle stops and fails;
#   4 accepted, but the credential it brought could not be stored (the cycle fails too).
send_file() {
  local file="$1" response="$STATE_DIR/response.json" code attempt=1 delay="$RETRY_DELAY_SECONDS"
  while :; do
    if ((attempt == 1)) && [[ "$SERVER_URL" == http://* && -z "$(compgen -G "$SPOOL_DIR/*.json")" ]] &&
      [[ "${VMHC_HTTP_CLIENT:-}" != external ]]; then
      UNTRUSTED=""
      post_builtin "$file" "$response"
    else
      post_report "$file" "$response"
    fi
    code="$HTTP_CODE"
    if [[ "$code" == 000 && -n "$UNTRUSTED" ]]; then
      # Not an outage: trying again changes nothing. The report waits for the trust to be set.
      log "the server's certificate is not trusted ($UNTRUSTED): set CA_FILE or PINNED_PUBKEY in $CONF_FILE"
      return 1
    fi
    case "$code" in
      2??)
        accepted "$response" || return 4
        return 0 ;;
      401 | 403)
        if [[ "$AUTH_KIND" == credential ]]; then
          log "the server rejected this VM's credential (revoked or rotated; HTTP $code): ask the admin for a new one (\`vm-healthcheck-agent --set-credential\`) or re-enrol with \`vm-healthcheck-agent --enrol\`"
          return 3
        fi
        log "the server rejected the agent token (HTTP $code): check AGENT_TOKEN in $CONF_FILE"
        return 2 ;;
      409)
        if [[ "$AUTH_KIND" == token ]]; then
          log "this identity is already enrolled by another credential (HTTP 409): $(error_message "$response"); if that credential is this VM's, install it with \`vm-healthcheck-agent --set-credential\`, else ask the admin to revoke it, then run \`vm-healthcheck-agent --enrol\`"
          return 3
        fi
        log "report refused (HTTP $code): $(error_message "$response")"
        return 2 ;;
      429 | 000 | 5??) ;;
      4??)
        log "report refused (HTTP $code): $(error_message "$response")"
        return 2 ;;
    esac
    if ((attempt >= RETRY_ATTEMPTS)); then
      if [[ "$code" == 000 ]]; then
        log "server $SERVER_URL unreachable"
      else
        log "server answered HTTP $code: $(error_message "$response")"
      fi
      return 1
    fi
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

# Keeps a report for later, dropping the oldest beyond SPOOL_MAX.
spool() {
  mkdir -p "$SPOOL_DIR" && chmod 700 "$SPOOL_DIR"
  local name stamp="${EPOCHREALTIME:-$(date +%s)}"
  # Names sort in the order reports were taken (fixed width, microseconds).
  printf -v name '%s/%020d-%s.json' "$SPOOL_DIR" "${stamp//[.,]/}" "$$"
  cp "$1" "$name"
  local files=("$SPOOL_DIR"/*.json)
  local excess=$((${#files[@]} - SPOOL_MAX))
  local i
  for ((i = 0; i < excess; i++)); do rm -f "${files[$i]}"; done
}

# Sends spooled reports oldest first; stops at the first that cannot be delivered yet.
# Returns 0 when the spool is empty, 1 when the server is unreachable, 3 when nothing more
# can be sent (see send_file).
replay_spool() {
  [[ -d "$SPOOL_DIR" ]] || return 0
  local file result
  for file in "$SPOOL_DIR"/*.json; do
    [[ -e "$file" ]] || return 0
    send_file "$file"
    result=$?
    case "$result" in
      0 | 2) rm -f "$file" ;;
      4) rm -f "$file" && return 3 ;;
      3) return 3 ;;
      *) return 1 ;;
    esac
  done
}

# One cycle: replay what is spooled, then report now (or spool it). Returns as send_file,
# 3 and 4 both as 3.
cycle() {
  # Fixed scratch names (one agent runs at a time: the systemd unit, or cron under flock)
  # spare a fork for rm on every report.
  local report="$STATE_DIR/report.json" result=0
  build_report
  printf '%s' "$REPORT" >"$report"
  replay_spool
  result=$?
  if ((result == 0)); then
    send_file "$report"
    result=$?
  fi
  case "$result" in
    # A report the server could not take, or that waits for this VM's credential to be
    # sorted out, is kept and sent later.
    1 | 3) spool "$report" ;;
    4) result=3 ;;
  esac
  return "$result"
}

# Reads a credential from standard input (never the command line) and stores it.
set_credential() {
  local credential=""
  if [[ -t 0 ]]; then
    printf 'new credential for this VM (vmhc_vm_...): ' >&2
    IFS= read -r -s credential || true
    printf '\n' >&2
  else
    IFS= read -r credential || true
  fi
  credential="${credential%$'\r'}"
  credential="${credential//[[:space:]]/}"
  local LC_ALL=C
  [[ "$credential" =~ $CREDENTIAL_PATTERN ]] ||
    die "standard input holds no credential (vmhc_vm_ and 64 hex digits); nothing changed"
  store_credential "$credential" || die "could not write $CREDENTIAL_FILE"
  echo "stored this VM's new credential in $CREDENTIAL_FILE"
}

main() {
  local mode="${1:---run}"
  umask 077
  # A server closing the connection early must not kill the agent mid-write.
  trap '' PIPE
  case "$mode" in
    --version) echo "$AGENT_VERSION" && return 0 ;;
    --set-credential)
      (($# == 1)) || die "--set-credential reads the credential from standard input, never from the command line"
      load_config
      set_credential
      return 0
      ;;
    --once | --tick | --run | --enrol) ;;
    *) die "usage: $0 [--once | --tick | --run | --enrol | --set-credential | --version]" ;;
  esac
  [[ -d "$STATE_DIR" ]] || mkdir -p "$STATE_DIR" 2>/dev/null || die "cannot create $STATE_DIR"
  load_config
  check_server_config
  if [[ "$mode" == --enrol ]]; then
    [[ -n "$AGENT_TOKEN" ]] || die "--enrol needs AGENT_TOKEN (in $CONF_FILE or the environment)"
    rm -f "$CREDENTIAL_FILE" || die "cannot remove $CREDENTIAL_FILE"
  fi
  load_auth
  local result
  case "$mode" in
    --once | --enrol)
      cycle
      result=$?
      if ((result != 0)); then
        die "report not accepted by $SERVER_URL (kept in $SPOOL_DIR when the server was unreachable)"
      fi
      echo "report accepted by $SERVER_URL"
      if [[ "$mode" == --enrol && "$AUTH_KIND" == token ]]; then
        echo "the server issued no credential: this VM goes on reporting with the agent token"
      fi
      ;;
    --tick)
      # Under cron, whose finest step is a minute, a short interval means several cycles.
      local runs=1 i
      if [[ "${VMHC_CRON:-}" == 1 ]] && ((INTERVAL_SECONDS < 60)); then runs=$((60 / INTERVAL_SECONDS)); fi
      for ((i = 1; i <= runs; i++)); do
        cycle
        result=$?
        # Only an admin can help now: fail, so the timer unit shows it.
        ((result == 3)) && exit 1
        if ((i < runs)); then sleep "$INTERVAL_SECONDS"; fi
      done
      # Otherwise a tick succeeds: undelivered reports wait in the spool.
      return 0
      ;;
    --run)
      log "reporting to $SERVER_URL every ${INTERVAL_SECONDS}s"
      while :; do
        cycle
        result=$?
        ((result == 3)) && exit 1
        sleep "$INTERVAL_SECONDS"
      done
      ;;
  esac
}

main "$@"
