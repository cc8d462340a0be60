#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages), then formatting, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
