#!/usr/bin/env bash
# The servers the test suite runs against, each on a free loopback port, started and stopped
# together: moto's DynamoDB server in a venv (.venv/moto, one request at a time:
# scripts/moto-server.py), a throwaway PostgreSQL cluster (scripts/postgres-server.sh, which
# installs PostgreSQL from Debian's packages if it is missing; as the unprivileged `postgres`
# user when run as root) with PgBouncer in transaction mode in front of it, a Redis server and a
# Redis Cluster of three masters (scripts/redis-server.sh, Debian's redis-server, the
# append-only file on). The alerts tests' Standard Webhooks verifier and JSON Schema checker
# share the moto venv.
#
#   source scripts/test-env.sh && test_env_start   # exports the servers' variables;
#                                                  # test_env_stop stops them (scripts/test.sh)
#   scripts/test-env.sh CMD [ARGS...]              # runs CMD with the servers up, then stops
#                                                  # them: `scripts/test-env.sh cargo test
#                                                  # --all-features --test store`
#
# With the servers up, a test that finds none fails instead of skipping
# (TOLLGATE_REQUIRE_SERVERS=1).

test_env_moto_pids=()
test_env_moto_logs=()

test_env_stop() {
  local p
  for p in ${test_env_moto_pids[@]+"${test_env_moto_pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -n "${test_env_bouncer_dir:-}" ]; then "$root/scripts/pgbouncer.sh" stop "$test_env_bouncer_dir" || true; fi
  if [ -n "${test_env_pg_dir:-}" ]; then "$root/scripts/postgres-server.sh" stop "$test_env_pg_dir" || true; fi
  # Tests that restart or pause a server start clusters of their own under this run's prefix
  # (tests/common/postgres.rs) and remove them when done; a test binary killed midway leaves
  # its clusters, stopped here (only this run's: another run on the machine keeps its own).
  if [ -n "${TOLLGATE_POSTGRES_OWN_PREFIX:-}" ]; then
    for own in "$TOLLGATE_POSTGRES_OWN_PREFIX"-*; do
      if [ -d "$own" ]; then "$root/scripts/postgres-server.sh" stop "$own" || true; fi
    done
  fi
  local d
  for d in ${test_env_redis_dirs[@]+"${test_env_redis_dirs[@]}"}; do
    "$root/scripts/redis-server.sh" stop "$d" || true
  done
  for p in ${test_env_moto_logs[@]+"${test_env_moto_logs[@]}"}; do rm -f "$p"; done
  return 0
}

# Starts one more moto server (one request at a time) and sets test_env_moto_endpoint to it:
# test binaries run side by side each get their own, so that neither queues behind the other's
# requests. Needs the venv test_env_start made.
test_env_moto() {
  local root port log pid
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log=$(mktemp)
  "$TOLLGATE_MOTO_PYTHON" "$root/scripts/moto-server.py" 127.0.0.1 "$port" >"$log" 2>&1 &
  pid=$!
  test_env_moto_pids+=("$pid")
  test_env_moto_logs+=("$log")
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "the DynamoDB server did not start"; return 1; }
    sleep 0.2
  done
  curl -s -o /dev/null "http://127.0.0.1:$port/moto-api/" || { cat "$log"; echo "the DynamoDB server did not answer"; return 1; }
  test_env_moto_endpoint="http://127.0.0.1:$port"
}

test_env_start() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # moto's DynamoDB server, in a venv.
  local venv="${TOLLGATE_MOTO_VENV:-$root/.venv/moto}"
  # With the official OTLP protobuf definitions, which the OTLP receiver decodes with.
  if ! "$venv/bin/python" -c 'import moto, flask, standardwebhooks, jsonschema, opentelemetry.proto' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[dynamodb]==5.2.5' flask flask-cors \
      'standardwebhooks==1.1.0' 'jsonschema==4.25.1' 'opentelemetry-proto==1.45.2'
  fi
  # Tests that stop and resume a server start one of their own with this Python.
  export TOLLGATE_MOTO_PYTHON="$venv/bin/python"
  test_env_moto || return 1
  export TOLLGATE_DYNAMODB_ENDPOINT="$test_env_moto_endpoint"
  # The servers are there: a test that finds none fails instead of skipping.
  export TOLLGATE_REQUIRE_SERVERS=1
  # The standard AWS environment, for a local server.
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  echo "moto on $TOLLGATE_DYNAMODB_ENDPOINT"

  # PostgreSQL, and PgBouncer in transaction mode in front of it (as RDS Proxy and most
  # managed pools run).
  test_env_pg_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-pg.XXXXXX")
  export TOLLGATE_POSTGRES_OWN_PREFIX="$test_env_pg_dir-own"
  # Through a variable: `eval "$(…)"` would swallow the script's failure.
  local env
  env=$("$root/scripts/postgres-server.sh" start "$test_env_pg_dir") || return 1
  eval "$env"
  echo "PostgreSQL on $TOLLGATE_POSTGRES_URL"
  test_env_bouncer_dir="$test_env_pg_dir-bouncer"
  env=$("$root/scripts/pgbouncer.sh" start "$test_env_bouncer_dir" "$TOLLGATE_POSTGRES_PORT") || return 1
  eval "$env"
  echo "PgBouncer (transaction mode) on $TOLLGATE_PGBOUNCER_URL"

  # Redis, one server and a cluster of three masters.
  local redis_dir cluster_dir
  redis_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-redis.XXXXXX")
  cluster_dir=$(mktemp -d -u "${TMPDIR:-/tmp}/tollgate-redis-cluster.XXXXXX")
  test_env_redis_dirs=("$redis_dir" "$cluster_dir")
  env=$("$root/scripts/redis-server.sh" start "$redis_dir") || return 1
  eval "$env"
  echo "Redis on $TOLLGATE_REDIS_URL"
  env=$("$root/scripts/redis-server.sh" start-cluster "$cluster_dir") || return 1
  eval "$env"
  echo "Redis Cluster (three masters) at $TOLLGATE_REDIS_CLUSTER_URL"
}

# Run as a command: the servers up around CMD.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  if [ $# -eq 0 ]; then
    echo "usage: scripts/test-env.sh CMD [ARGS...]   (or: source scripts/test-env.sh)" >&2
    exit 2
  fi
  trap test_env_stop EXIT
  test_env_start
  "$@"
fi
