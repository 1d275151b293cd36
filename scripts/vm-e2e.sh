#!/usr/bin/env bash
# Prepares the small Debian guest the end-to-end suite boots under QEMU: kernel, initrd and a
# pristine disk whose first boot installs the vm-healthcheck agent from the server named on the
# kernel command line (vmhc.server=URL vmhc.token=TOKEN: a test token; /proc/cmdline is
# readable by every local user, so real guests use --token-file as the README says).
#
#   scripts/vm-e2e.sh               build the guest into the cache (each step only once)
#   scripts/vm-e2e.sh --print-env   build if needed, then print VMHC_GUEST_KERNEL/INITRD/DISK
#   scripts/vm-e2e.sh --boot-check  boot a copy once: install, guest agent, hang, reset
#   scripts/vm-e2e.sh --timings     medians of the scenario timings the test runs kept
#
# Tests copy the disk per run (cp --sparse=always) and never write to the cached one. Progress
# goes to standard error, so `eval "$(scripts/vm-e2e.sh --print-env)"` works.
set -euo pipefail

# Bump when what is written into the guest tree changes: the tree and disk are rebuilt.
GUEST_VERSION=2
SUITE=bookworm
INCLUDE=linux-image-amd64,systemd-sysv,udev,curl,qemu-guest-agent,ca-certificates,procps,gawk,iproute2,cron

cache="$(realpath -m "${VMHC_GUEST_CACHE:-/var/cache/vm-healthcheck/guest}")"
mode=build
case "${1:-}" in
  "") ;;
  --print-env) mode=print-env ;;
  --boot-check) mode=boot-check ;;
  --timings) mode=timings ;;
  -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--print-env | --boot-check | --timings]" >&2; exit 2 ;;
esac

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'vm-e2e: %s\n' "$*" >&2; exit 1; }

install_tools() {
  local -A need=([qemu-system-x86_64]=qemu-system-x86 [mmdebstrap]=mmdebstrap [mke2fs]=e2fsprogs [socat]=socat)
  local cmd pkgs=()
  for cmd in "${!need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || pkgs+=("${need[$cmd]}")
  done
  ((${#pkgs[@]})) || return 0
  say "installing ${pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

# Written into the guest: the first-boot installer, run by vmhc-install.service.
write_guest_installer() {
  cat >"$1" <<'GUEST'
#!/bin/bash
# First boot of an end-to-end guest: installs the vm-healthcheck agent the way the README says,
# from vmhc.server=URL with vmhc.token=TOKEN on the kernel command line.
set -euo pipefail
server="" token="" interval=30
read -r -a words </proc/cmdline
for word in "${words[@]}"; do
  case "$word" in
    vmhc.server=*) server="${word#vmhc.server=}" ;;
    vmhc.token=*) token="${word#vmhc.token=}" ;;
    vmhc.interval=*) interval="${word#vmhc.interval=}" ;;
  esac
done
if [[ -z "$server" || -z "$token" ]]; then
  echo "vmhc-install: no vmhc.server= and vmhc.token= on the kernel command line: nothing to do"
  exit 0
fi
if [[ -e /etc/vm-healthcheck/credential ]]; then
  echo "vmhc-install: this VM already holds a credential"
  exit 0
fi
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
printf '%s\n' "$token" >token
# The server may still be starting when the guest is up: retry whatever goes wrong, briefly.
curl -fsSL --retry 15 --retry-all-errors --retry-delay 2 --max-time 30 "$server/agents/install.sh" -o install.sh
# The test server speaks plain http: the installer refuses it without --insecure.
insecure=()
if [[ "$server" == http://* ]]; then insecure=(--insecure); fi
echo "vmhc-install: bash install.sh --server $server --token-file $work/token --interval $interval ${insecure[*]}"
bash install.sh --server "$server" --token-file "$work/token" --interval "$interval" "${insecure[@]}"
GUEST
  chmod 755 "$1"
}

customize_tree() {
  local t="$1"
  mkdir -p "$t/etc/systemd/network"
  # DHCP only, no IPv6 autoconfiguration: wait-online then returns as soon as the lease is in.
  cat >"$t/etc/systemd/network/20-e2e.network" <<'EOF'
[Match]
Name=en*

[Network]
DHCP=ipv4
IPv6AcceptRA=no
LinkLocalAddressing=no
EOF
  echo '/dev/vda / ext4 rw 0 1' >"$t/etc/fstab"
  echo e2e-guest >"$t/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\te2e-guest\n' >"$t/etc/hosts"
  # Nobody logs in (the guest agent runs commands): root stays locked.
  sed -i 's/^root:[^:]*:/root:!:/' "$t/etc/shadow"
  write_guest_installer "$t/usr/local/sbin/vmhc-install"
  cat >"$t/etc/systemd/system/vmhc-install.service" <<'EOF'
[Unit]
Description=vm-healthcheck end-to-end: install the agent from the server on the kernel command line
After=network-online.target
Wants=network-online.target
ConditionPathExists=!/etc/vm-healthcheck/credential

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmhc-install
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=300

[Install]
WantedBy=multi-user.target
EOF
  # qemu-guest-agent.service has no [Install]: udev starts it once the virtio port
  # org.qemu.guest_agent.0 appears (60-qemu-guest-agent.rules). Check that rule is still there.
  grep -qs 'org.qemu.guest_agent.0' "$t"/lib/udev/rules.d/*qemu-guest-agent*.rules ||
    die "the guest's qemu-guest-agent no longer ships its udev rule: enable the unit another way"
  systemctl --root="$t" enable systemd-networkd.service systemd-networkd-wait-online.service \
    vmhc-install.service >/dev/null 2>&1
  # The guest has no mirror to reach: apt's daily runs would only burn emulated CPU.
  systemctl --root="$t" disable apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1
}

build_guest() {
  mkdir -p "$cache"
  # Parallel test runs may all ask for the guest: one builds, the others wait for it.
  exec 9>"$cache/.lock"
  flock 9
  local stamp="$cache/stamp" t0 f
  # The package set names the root file system; the recipe version the tree made from it.
  if [[ "$(cat "$cache/rootfs.stamp" 2>/dev/null)" != "$SUITE $INCLUDE" ]]; then
    rm -rf "$cache/rootfs.tar" "$cache/rootfs.tar.part"
    echo "$SUITE $INCLUDE" >"$cache/rootfs.stamp"
  fi
  if [[ "$(cat "$stamp" 2>/dev/null)" != "GUEST_VERSION=$GUEST_VERSION" ]]; then
    # Another recipe built what is there: start over from the root file system, with the
    # stamp first so that the steps below resume an interrupted build of this recipe.
    rm -rf "$cache/tree" "$cache/tree.part" "$cache/vmlinuz" "$cache/initrd.img" \
      "$cache/disk.img" "$cache/disk.img.part"
    echo "GUEST_VERSION=$GUEST_VERSION" >"$stamp"
  fi

  if [[ ! -s "$cache/rootfs.tar" ]]; then
    say "mmdebstrap $SUITE (a few minutes)"
    t0=$SECONDS
    local sources=/etc/apt/sources.list.d/debian.sources
    [[ -r "$sources" ]] || die "no $sources to take the Debian mirror from"
    mmdebstrap --quiet --format=tar --variant=apt --include="$INCLUDE" "$SUITE" "$cache/rootfs.tar.part" - <"$sources"
    mv "$cache/rootfs.tar.part" "$cache/rootfs.tar"
    say "mmdebstrap took $((SECONDS - t0))s"
  fi

  if [[ ! -d "$cache/tree" ]]; then
    say "unpacking and configuring the guest tree"
    t0=$SECONDS
    rm -rf "$cache/tree.part"
    mkdir "$cache/tree.part"
    # /dev is the kernel's devtmpfs at boot: its nodes are not needed in the image.
    tar -C "$cache/tree.part" --numeric-owner --exclude='./dev/*' -xpf "$cache/rootfs.tar"
    customize_tree "$cache/tree.part"
    mv "$cache/tree.part" "$cache/tree"
    say "tree ready in $((SECONDS - t0))s"
  fi

  if [[ ! -s "$cache/vmlinuz" || ! -s "$cache/initrd.img" ]]; then
    for f in vmlinuz initrd.img; do
      local found=("$cache"/tree/boot/"$f"-*)
      [[ ${#found[@]} -eq 1 && -e "${found[0]}" ]] || die "expected one /boot/$f-* in the guest, found: ${found[*]}"
      cp "${found[0]}" "$cache/$f.part"
      mv "$cache/$f.part" "$cache/$f"
    done
  fi

  if [[ ! -s "$cache/disk.img" ]]; then
    say "making disk.img from the tree"
    t0=$SECONDS
    rm -f "$cache/disk.img.part"
    mke2fs -q -t ext4 -d "$cache/tree" "$cache/disk.img.part" 2G >/dev/null
    mv "$cache/disk.img.part" "$cache/disk.img"
    say "disk.img ready in $((SECONDS - t0))s"
  fi
  exec 9>&-
}

print_env() {
  printf 'VMHC_GUEST_KERNEL=%s\nVMHC_GUEST_INITRD=%s\nVMHC_GUEST_DISK=%s\n' \
    "$cache/vmlinuz" "$cache/initrd.img" "$cache/disk.img"
}

# QMP and guest-agent client for --boot-check: `ctl.py qmp|qga SOCKET JSON [TIMEOUT]` prints the
# "return" value as JSON, or exits 1 (error or no answer in time).
write_ctl() {
  cat >"$1" <<'PY'
import json, socket, sys, time, random

def lines(sock, deadline):
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise EOFError
        buf += data

def answer(it):
    # Skips QMP events and anything that is not an answer.
    for line in it:
        line = line.strip(b"\xff \r")
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "return" in msg or "error" in msg:
            return msg

def main():
    kind, path, cmd = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 10
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    it = lines(s, deadline)
    if kind == "qmp":
        next(it)  # the greeting comes first; nothing is accepted before qmp_capabilities
        s.sendall(b'{"execute":"qmp_capabilities"}\n')
        answer(it)
    else:
        # 0xFF resets the agent's parser (a half-sent command of an earlier client); the
        # answer to guest-sync-delimited starts with 0xFF, and stale answers of an earlier
        # client are skipped until the one carrying this id.
        sync_id = random.randrange(1, 2**31)
        s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode() + b"\n")
        while answer(it).get("return") != sync_id:
            pass
    s.sendall(json.dumps(cmd).encode() + b"\n")
    msg = answer(it)
    if "error" in msg:
        print(json.dumps(msg["error"]), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(msg["return"]))

try:
    main()
except (TimeoutError, EOFError, OSError, StopIteration):
    sys.exit(1)
PY
}

# Seconds since a start taken from $EPOCHREALTIME, to a tenth.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }

# Globals: the EXIT trap runs after boot_check has returned.
run="" qemu_pid="" http_pid=""
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  if [[ -n "$qemu_pid" ]]; then kill "$qemu_pid" 2>/dev/null || true; fi
  if [[ -n "$http_pid" ]]; then kill "$http_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  if [[ -z "$run" ]]; then return; fi
  if [[ -n "${VMHC_KEEP_RUN:-}" ]]; then echo "kept $run" >&2; else rm -rf "$run"; fi
}

qmp() { python3 "$run/ctl.py" qmp "$run/qmp.sock" "$@"; }
qga() { python3 "$run/ctl.py" qga "$run/qga.sock" "$@"; }
agent_ping() { qga '{"execute":"guest-ping"}' "${1:-3}" >/dev/null 2>&1; }
agent_silent() { ! agent_ping 3; }
vm_status() { qmp '{"execute":"query-status"}' 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])'; }
install_ran() { grep -q 'GET /agents/install.sh' "$run/http.log" && grep -q INSTALL-RAN "$run/console.log"; }
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds, or fails the check.
wait_for() {
  local limit=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then
      tail -30 "$run/console.log" >&2 || true
      die "no $what within ${limit}s"
    fi
    kill -0 "$qemu_pid" 2>/dev/null || die "QEMU exited: $(cat "$run/qemu.log")"
    sleep 0.5
  done
}

boot_check() {
  command -v python3 >/dev/null || die "--boot-check needs python3"
  trap cleanup EXIT
  run="$(mktemp -d /tmp/vm-e2e.XXXXXX)"
  write_ctl "$run/ctl.py"

  # The server under test, faked: an installer that only says it ran and leaves a credential,
  # so that the next boot must not install again.
  mkdir -p "$run/www/agents"
  cat >"$run/www/agents/install.sh" <<'EOF'
echo "INSTALL-RAN $*"
mkdir -p /etc/vm-healthcheck && touch /etc/vm-healthcheck/credential
EOF
  # Port 0: the server picks a free port and prints it.
  python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$run/www" >"$run/http.out" 2>"$run/http.log" &
  http_pid=$!
  local port="" deadline=$((SECONDS + 10))
  until port="$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$run/http.out")" && [[ -n "$port" ]]; do
    ((SECONDS < deadline)) || die "the HTTP server did not start"
    sleep 0.1
  done

  cp --sparse=always "$cache/disk.img" "$run/disk.img"
  local t0=$EPOCHREALTIME t1
  qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -display none -no-shutdown \
    -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=0 vmhc.server=http://10.0.2.100:3000 vmhc.token=x" \
    -drive "file=$run/disk.img,if=virtio,format=raw" \
    -uuid 3f1c6a52-0c1e-4c57-9d0a-1b2c3d4e5f60 \
    -nic "user,model=virtio-net-pci,restrict=on,guestfwd=tcp:10.0.2.100:3000-cmd:socat - TCP:127.0.0.1:$port" \
    -qmp "unix:$run/qmp.sock,server=on,wait=off" \
    -chardev "socket,path=$run/qga.sock,server=on,wait=off,id=qga0" \
    -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    -serial "file:$run/console.log" >"$run/qemu.log" 2>&1 &
  qemu_pid=$!

  wait_for 30 "QMP socket" test -S "$run/qmp.sock"
  [[ "$(vm_status)" == running ]] || die "QMP query-status does not say running"
  wait_for 180 "guest agent answer" agent_ping
  say "power-on to guest-ping answer: $(since "$t0")"
  wait_for 180 "install (GET /agents/install.sh, INSTALL-RAN on the console)" install_ran
  say "power-on to installer run: $(since "$t0")"
  grep -m1 INSTALL-RAN "$run/console.log" >&2
  wait_for 120 "login prompt" grep -q 'e2e-guest login:' "$run/console.log"
  say "power-on to login prompt: $(since "$t0")"

  # What a monitor can read besides the agent: QMP block counters (cumulative, not cleared by
  # a reset), and the guest's own interface counters through the guest agent.
  say "QMP query-blockstats: $(qmp '{"execute":"query-blockstats"}' | python3 -c '
import json, sys
for d in json.load(sys.stdin):
    if d.get("device") == "virtio0":
        print("virtio0 rd_bytes", d["stats"]["rd_bytes"], "wr_bytes", d["stats"]["wr_bytes"])')"
  say "QGA guest-network-get-interfaces: $(qga '{"execute":"guest-network-get-interfaces"}' | python3 -c '
import json, sys
for i in json.load(sys.stdin):
    st = i.get("statistics", {})
    print(i["name"], "rx-bytes", st.get("rx-bytes"), "tx-bytes", st.get("tx-bytes"), end="; ")')"

  t1=$EPOCHREALTIME
  local pid
  pid="$(qga '{"execute":"guest-exec","arguments":{"path":"/bin/true","capture-output":true}}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')"
  exec_done() { qga "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}" | grep -q '"exited": true'; }
  wait_for 30 "guest-exec of /bin/true" exec_done
  say "guest-exec /bin/true to guest-exec-status exited: $(since "$t1")"

  # A real hang: the kernel panics (panic=0 keeps it there) and QEMU still says running.
  t1=$EPOCHREALTIME
  qga '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","echo c > /proc/sysrq-trigger"]}}' 5 >/dev/null || true
  wait_for 60 "hang (guest-ping still answers)" agent_silent
  say "sysrq crash to guest-ping timing out (3 s timeout included): $(since "$t1")"
  wait_for 30 "kernel panic on the console" grep -q 'Kernel panic' "$run/console.log"
  [[ "$(vm_status)" == running ]] || die "QMP query-status does not say running while the guest hangs"
  say "hung guest: QMP query-status says running"

  t1=$EPOCHREALTIME
  qmp '{"execute":"system_reset"}' >/dev/null
  wait_for 180 "guest agent answer after system_reset" agent_ping
  say "system_reset to guest-ping answer: $(since "$t1")"
  local gets
  gets="$(grep -c 'GET /agents/install.sh' "$run/http.log")"
  ((gets == 1)) || die "the installer ran $gets times (a guest holding a credential must not install again)"
  say "boot check passed (installer fetched once, not again after the reset)"
}

# The medians of the scenario timings kept by the test runs on this machine (BENCHMARKS.md).
if [[ $mode == timings ]]; then
  python3 - "$(dirname "$0")/../target/vm-e2e-timings.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{len(runs)} runs")
for key in runs[0]:
    values = [r[key] for r in runs if key in r]
    print(f"{key}: median {statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})")
PY
  exit
fi

# Standard output is for --print-env alone.
install_tools >&2
build_guest >&2
case "$mode" in
  build) say "guest ready in $cache" ;;
  print-env) print_env ;;
  boot-check) boot_check ;;
esac
