#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages), then formatting, lints, the
# tests, and the static release binary (built and checked to be statically linked).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

# One static executable: no dynamic loader, no OpenSSL, no system DNS library at run time.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu
bin=target/x86_64-unknown-linux-gnu/release/regcache
if ! ldd "$bin" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
  echo "FAIL: $bin is dynamically linked:" >&2
  ldd "$bin" >&2 || true
  exit 1
fi
"$bin" check-config config/regcache.toml >/dev/null
echo "static binary OK: $bin ($(stat -c %s "$bin") bytes)"
