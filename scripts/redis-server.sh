#!/usr/bin/env bash
# A throwaway Redis server for the tests, in a directory of its own.
#
#   scripts/redis-server.sh start DIR           # prints `export …` lines for the tests
#   scripts/redis-server.sh start-cluster DIR   # a Redis Cluster of three masters, likewise
#   scripts/redis-server.sh stop DIR            # either
#
# Installs Redis from Debian's packages if it is missing (as root, or through sudo). The server
# listens on a free loopback port only, with the append-only file on (`appendonly yes`,
# `appendfsync everysec`, as docs/redis.md advises) and no eviction (`maxmemory-policy
# noeviction`), its files in DIR. Debian's release here ships Redis 7.0: the store uses only
# commands Redis 7.0 and Valkey 7.2 both have.
#
# The cluster's three masters (no replicas) each serve a third of the slots, created with
# `redis-cli --cluster create` (https://redis.io/docs/latest/operate/oss_and_stack/management/scaling/):
# each node listens on its port and on its cluster bus, the port plus 10000.
set -euo pipefail

cmd=${1:?start, start-cluster or stop}
dir=${2:?a directory}

install() {
  if ! command -v redis-server >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
    # The package may start a server of its own on 6379: the tests never use it.
    { $sudo service redis-server stop || true; } >/dev/null 2>&1
  fi
  command -v redis-cli >/dev/null || { echo "redis-cli is missing (Debian's redis-tools)" >&2; exit 1; }
}

# A free loopback port whose cluster bus (the port plus 10000) is free too.
free_port() {
  python3 - <<'PY'
import random, socket
for _ in range(1000):
    port = random.randint(20000, 55000)
    try:
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
    except OSError:
        continue
    print(port)
    break
PY
}

# Starts one server in $1 on port $2, with any further arguments.
serve() {
  local at=$1 port=$2
  shift 2
  mkdir -p "$at"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$at" --daemonize yes --pidfile "$at/redis.pid" \
    --logfile "$at/server.log" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
    --save "" "$@" >&2
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$port" ping >/dev/null 2>&1 || { cat "$at/server.log" >&2; exit 1; }
}

# Stops the server whose files are in $1.
halt() {
  if [ -f "$1/redis.pid" ]; then
    pid=$(cat "$1/redis.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

case $cmd in
start)
  install
  port=$(free_port)
  serve "$dir" "$port"
  echo "export TOLLGATE_REDIS_URL=redis://127.0.0.1:$port"
  ;;
start-cluster)
  install
  nodes=()
  for n in 1 2 3; do
    port=$(free_port)
    serve "$dir/node-$n" "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >&2
  # Every node must know every slot's master before a test connects.
  for node in "${nodes[@]}"; do
    for _ in $(seq 100); do
      redis-cli -h "${node%:*}" -p "${node#*:}" cluster info | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -h "${node%:*}" -p "${node#*:}" cluster info | grep -q '^cluster_state:ok' \
      || { echo "the cluster did not form" >&2; cat "$dir"/node-*/server.log >&2; exit 1; }
  done
  echo "export TOLLGATE_REDIS_CLUSTER_URL=redis://${nodes[0]}"
  ;;
stop)
  halt "$dir"
  for node in "$dir"/node-*; do
    [ -d "$node" ] && halt "$node"
  done
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|start-cluster|stop DIR" >&2
  exit 2
  ;;
esac
