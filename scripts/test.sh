#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints (warnings denied), unit, behaviour and
# doc tests, the docs, and a smoke run of the quickstart over real HTTP.
# Needs only the Rust toolchain (cargo, rustfmt, clippy), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit and behaviour tests"
cargo test --workspace --locked --lib --bins --tests --examples

step "without default features (no SQLite): builds, and names the feature a [store] needs"
cargo test --workspace --locked --no-default-features --test config

step "doc tests"
cargo test --workspace --locked --doc

step "docs (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --locked --no-deps

step "benchmarks compile and run once"
cargo test --workspace --locked --benches -- --test 2>&1 | tail -n 3

step "quickstart smoke test"
scripts/smoke-quickstart.sh
