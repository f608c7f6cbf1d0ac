#!/usr/bin/env bash
# The whole test suite, as CI runs it, from a fresh clone.
#
# 1. Provides PostgreSQL and RabbitMQ (scripts/engines.sh: uses running ones, else installs and
#    starts throwaway loopback instances when root; fails saying what to run otherwise).
#    Installs the pool providers' test peers (scripts/pool-tools.sh, scripts/moto.sh) and the
#    dashboard test's headless browser (scripts/browser.sh: Debian's chromium).
# 2. cargo fmt --check, cargo clippy -D warnings, then the whole workspace's tests: built by cargo,
#    run by scripts/test-lanes.py in two lanes side by side (most binaries wait far more than they
#    compute), the binaries that restart the shared engines alone after them; then the doctests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

scripts/engines.sh start
artifacts=$(mktemp)
trap 'rm -f "$artifacts"; scripts/engines.sh stop || true' EXIT
# The pool providers' peers: ipmi_sim + ipmitool, wakeonlan, dnsmasq (Debian), moto (PyPI, in a
# virtual environment). Installed when missing; the tests fail, never skip, without them.
scripts/pool-tools.sh
scripts/moto.sh >/dev/null
# Debian's chromium, for the dashboard's browser test (cell/tests/dashboard.rs).
scripts/browser.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-run --message-format=json-render-diagnostics >"$artifacts"
python3 scripts/test-lanes.py <"$artifacts"
cargo test --workspace --doc
