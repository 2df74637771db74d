#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, in a directory of its own.
#
#   scripts/postgres-server.sh start DIR   # prints `export …` lines for the tests
#   scripts/postgres-server.sh stop DIR
#
# Installs PostgreSQL from Debian's packages if it is missing (as root, or through sudo).
# PostgreSQL refuses to run as root: when this script runs as root, the cluster belongs to the
# unprivileged `postgres` user the package creates and every server command runs as that user.
# The cluster listens on a free loopback port and on a socket in DIR, trusts local connections
# (role `tollgate`, a superuser), and skips fsync: it holds test data only, and the tests stop
# and restart it cleanly (`pg_ctl restart -m fast`), never by a power cut. pg_stat_statements is
# loaded, for examples/postgres_traffic.rs.
set -euo pipefail

cmd=${1:?start or stop}
dir=${2:?a directory}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $cmd in
start)
  bin=$(pg_bin)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
    bin=$(pg_bin)
  fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -U tollgate --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements" \
    start >&2 || { cat "$dir/server.log" >&2; exit 1; }
  echo "export TOLLGATE_POSTGRES_URL=postgres://tollgate@127.0.0.1:$port/postgres"
  echo "export TOLLGATE_POSTGRES_BIN=$bin TOLLGATE_POSTGRES_DATA=$dir/data TOLLGATE_POSTGRES_PORT=$port"
  ;;
stop)
  bin=$(pg_bin)
  [ -d "$dir/data" ] && as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop DIR" >&2
  exit 2
  ;;
esac
