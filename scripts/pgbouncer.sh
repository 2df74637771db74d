#!/usr/bin/env bash
# PgBouncer in transaction mode in front of the test cluster, in a directory of its own.
#
#   scripts/pgbouncer.sh start DIR PGPORT   # prints `export TOLLGATE_PGBOUNCER_URL=…`
#   scripts/pgbouncer.sh stop DIR
#
# Installs PgBouncer from Debian's packages if it is missing (as root, or through sudo).
# PgBouncer refuses to run as root: when this script runs as root, it runs as the unprivileged
# `postgres` user. Transaction mode with a pool of two server connections per database and
# user, so that the clients of a test take turns on the same server connections: a session
# state left by one (a named prepared statement, a SET) would reach another, and fail.
set -euo pipefail

cmd=${1:?start or stop}
dir=${2:?a directory}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $cmd in
start)
  pg_port=${3:?the PostgreSQL port}
  if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pgbouncer >&2
  fi
  bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
  mkdir -p "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 500
server_reset_query =
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  echo '"tollgate" ""' >"$dir/users.txt"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
  as_owner "$bin" -d "$dir/pgbouncer.ini" >&2
  up=no
  for _ in $(seq 50); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
      up=yes
      break
    fi
    sleep 0.1
  done
  if [ "$up" != yes ]; then
    cat "$dir/pgbouncer.log" >&2 || true
    echo "PgBouncer did not start" >&2
    exit 1
  fi
  echo "export TOLLGATE_PGBOUNCER_URL=postgres://tollgate@127.0.0.1:$port/postgres"
  ;;
stop)
  [ -f "$dir/pgbouncer.pid" ] && kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start DIR PGPORT | stop DIR" >&2
  exit 2
  ;;
esac
