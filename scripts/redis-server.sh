#!/usr/bin/env bash
# A throwaway Redis server for the tests, in a directory of its own.
#
#   scripts/redis-server.sh start DIR   # prints `export …` lines for the tests
#   scripts/redis-server.sh stop DIR
#
# Installs Redis from Debian's packages if it is missing (as root, or through sudo). The server
# listens on a free loopback port only, with the append-only file on (`appendonly yes`,
# `appendfsync everysec`, as docs/redis.md advises) and no eviction (`maxmemory-policy
# noeviction`), its files in DIR. Debian's release here ships Redis 7.0: the store uses only
# commands Redis 7.0 and Valkey 7.2 both have.
set -euo pipefail

cmd=${1:?start or stop}
dir=${2:?a directory}

case $cmd in
start)
  if ! command -v redis-server >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
    # The package may start a server of its own on 6379: the tests never use it.
    { $sudo service redis-server stop || true; } >/dev/null 2>&1
  fi
  command -v redis-cli >/dev/null || { echo "redis-cli is missing (Debian's redis-tools)" >&2; exit 1; }
  mkdir -p "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
    --logfile "$dir/server.log" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
    --save "" >&2
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null 2>&1 || { cat "$dir/server.log" >&2; exit 1; }
  echo "export TOLLGATE_REDIS_URL=redis://127.0.0.1:$port"
  ;;
stop)
  if [ -f "$dir/redis.pid" ]; then
    pid=$(cat "$dir/redis.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop DIR" >&2
  exit 2
  ;;
esac
