#!/usr/bin/env bash
# The operator dashboard in a real browser: Debian's chromium and chromium-driver (installed
# when missing, as scripts/postgres-server.sh installs PostgreSQL), Selenium from PyPI in a
# venv. Starts the axum example that seeds a SQLite store and mounts the dashboard, checks the
# rules of `tollgate dashboard`'s token, then drives both in headless Chromium
# (scripts/dashboard-browser.py). Screenshots go to target/dashboard-screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >&2
fi
venv=.venv/browser
if ! "$venv/bin/python" -c 'import selenium' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'selenium==4.27.1'
fi

cargo build --locked -p tollgate-axum --features dashboard --example dashboard
cargo build --locked -p tollgate-cli
target="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
work=$(mktemp -d)
shots="$target/dashboard-screenshots"
mkdir -p "$shots"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
cli_port=$(free_port)
token="dashboard-token-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
echo "$token" >"$work/token"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_for() { # url pid log [tenths of a second]
  for _ in $(seq "${4:-300}"); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "did not start:"; cat "$3"; exit 1
}

TOLLGATE_DB="$work/dashboard.db" TOLLGATE_DASHBOARD_TOKEN_FILE="$work/token" PORT=$port RUST_LOG=warn \
  "$target/debug/examples/dashboard" >"$work/example.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$port/ops/" "${pids[-1]}" "$work/example.log"

# `tollgate dashboard`: off loopback without a token it refuses to start.
config="$work/dashboard.db.toml"
grep -v '^token_file' "$config" >"$work/no-token.toml"
if out=$("$target/debug/tollgate" --config "$work/no-token.toml" dashboard --listen 0.0.0.0:0 2>&1); then
  echo "FAIL tollgate dashboard started on 0.0.0.0 without a token"; exit 1
fi
grep -q "without an access token" <<<"$out" || { echo "FAIL unexpected refusal: $out"; exit 1; }
echo "ok   tollgate dashboard refuses 0.0.0.0 without a token"
# On loopback too, over a store other than a local SQLite file: refused before it is opened.
{ sed '/^\[store\]/,/^$/d' "$work/no-token.toml"; printf '[store]\nkind = "postgres"\nurl = "postgres://127.0.0.1:1/none"\n'; } \
  >"$work/shared.toml"
# (Each within 20 seconds: a rule that regressed would serve, not fail.)
if out=$(timeout 20 "$target/debug/tollgate" --config "$work/shared.toml" dashboard --listen 127.0.0.1:0 2>&1); then
  echo "FAIL tollgate dashboard served a shared store on loopback without a token"; exit 1
fi
grep -q "its store (postgres) is shared" <<<"$out" || { echo "FAIL unexpected refusal: $out"; exit 1; }
echo "ok   tollgate dashboard refuses a shared store on loopback without a token"
# A token shorter than 32 random characters, or plainly not random, is refused, saying why.
printf 'short-token-0123' >"$work/short-token"
if out=$(timeout 20 "$target/debug/tollgate" --config "$work/no-token.toml" dashboard --listen 127.0.0.1:0 \
  --token-file "$work/short-token" 2>&1); then
  echo "FAIL tollgate dashboard took a 16-character token"; exit 1
fi
grep -q "at least 32 random characters" <<<"$out" || { echo "FAIL unexpected refusal: $out"; exit 1; }
printf 'abcdabcdabcdabcdabcdabcdabcdabcdabcd' >"$work/repeated-token"
if out=$(timeout 20 "$target/debug/tollgate" --config "$work/no-token.toml" dashboard --listen 127.0.0.1:0 \
  --token-file "$work/repeated-token" 2>&1); then
  echo "FAIL tollgate dashboard took a repeated token"; exit 1
fi
grep -q "repeats its first 4" <<<"$out" || { echo "FAIL unexpected refusal: $out"; exit 1; }
echo "ok   tollgate dashboard refuses a short or repeated token, saying why"
"$target/debug/tollgate" --config "$work/no-token.toml" dashboard --listen "127.0.0.1:$cli_port" \
  --token-file "$work/token" >"$work/cli.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$cli_port/" "${pids[-1]}" "$work/cli.log"
status=$(curl -s -o "$work/401.html" -w '%{http_code}' "http://127.0.0.1:$cli_port/")
[ "$status" = 401 ] || { echo "FAIL without the token: $status"; exit 1; }
if grep -q 'acme' "$work/401.html"; then echo "FAIL the 401 page shows a tenant"; exit 1; fi
echo "ok   tollgate dashboard with a token: 401 without it, nothing rendered"

# The example again, filled with a week of 50 tenants' traffic (TOLLGATE_SEED=week): the
# pictures of docs/dashboard.md are taken from it (into $shots/docs; copy them to docs/images).
seed_port=$(free_port)
TOLLGATE_SEED=week TOLLGATE_DB="$work/week.db" TOLLGATE_DASHBOARD_TOKEN_FILE="$work/token" PORT=$seed_port \
  RUST_LOG=warn "$target/debug/examples/dashboard" >"$work/week.log" 2>&1 &
pids+=($!)
# It listens once the week is written: up to 2 minutes on a debug build.
wait_for "http://127.0.0.1:$seed_port/ops/" "${pids[-1]}" "$work/week.log" 1200

"$venv/bin/python" scripts/dashboard-browser.py "http://127.0.0.1:$port/ops" "$token" "$work/dashboard.db" "$shots" \
  "http://127.0.0.1:$cli_port" "http://127.0.0.1:$seed_port/ops"
