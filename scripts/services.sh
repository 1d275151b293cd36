#!/usr/bin/env bash
# Starts the shared PostgreSQL and Redis the tests use, when they are not running already.
set -euo pipefail

if ! command -v pg_ctlcluster >/dev/null || ! command -v redis-server >/dev/null; then
  echo "==> installing postgresql and redis-server"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null
fi

# Prints "version name port status" of the cluster to use: the one configured for port 5432,
# else the newest version's (several versions may be installed side by side).
pick_pg_cluster() {
  local clusters
  clusters="$(pg_lsclusters --no-header)"
  awk '$3 == 5432 { print $1, $2, $3, $4; found = 1; exit } END { exit !found }' <<<"$clusters" ||
    sort -V -k1,1 <<<"$clusters" | awk 'NF { last = $1 " " $2 " " $3 " " $4 } END { if (last == "") exit 1; print last }'
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ! read -r pg_version pg_name pg_port pg_status < <(pick_pg_cluster); then
    echo "no PostgreSQL cluster found (pg_lsclusters lists none); create one with pg_createcluster" >&2
    exit 1
  fi
  if [[ $pg_port != 5432 ]]; then
    if [[ $pg_status == online* ]]; then
      echo "PostgreSQL $pg_version/$pg_name runs on port $pg_port, the tests expect 5432" >&2
      exit 1
    fi
    # No cluster is configured for 5432: give the newest one that port, once and for all.
    echo "==> configuring PostgreSQL $pg_version/$pg_name for port 5432 (was $pg_port)"
    pg_conftool "$pg_version" "$pg_name" set port 5432
  fi
  if [[ $pg_status == online* ]]; then
    echo "==> PostgreSQL $pg_version/$pg_name is running; waiting until it accepts connections"
  else
    echo "==> starting PostgreSQL $pg_version/$pg_name"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_name" start
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "==> starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

for _ in $(seq 1 50); do
  if pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.2
done
echo "PostgreSQL or Redis did not come up" >&2
exit 1
