#!/usr/bin/env bash
# Builds the benchmark's 200 MiB single-layer image as an OCI layout, offline (umoci + the static
# /bin/busybox of busybox-static), in the manner of tests/fixtures/build-images.sh.
#
#   build-big.sh OUTDIR [MIB]
#
# OUTDIR/big200 tag latest: ONE layer holding a busybox userland and /data/random.bin, MIB (default
# 200) MiB of incompressible but reproducible bytes (AES-CTR keystream), so the layer blob is about
# MIB MiB after gzip. OUTDIR/big200/.done is written last.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 OUTDIR [MIB]" >&2
  exit 2
fi
OUT=$1
MIB=${2:-200}
BYTES=$((MIB * 1024 * 1024))
CREATED=2024-01-01T00:00:00Z
BUSYBOX=/bin/busybox

for tool in umoci openssl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-big: '$tool' missing" >&2; exit 1; }
done
[ -x "$BUSYBOX" ] || { echo "build-big: $BUSYBOX missing (busybox-static)" >&2; exit 1; }

export HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost
export http_proxy=$HTTP_PROXY https_proxy=$HTTPS_PROXY no_proxy=$NO_PROXY

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LAYOUT="$OUT/big200"
rm -rf "$LAYOUT" "$OUT/.work-big"
WORK="$OUT/.work-big"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:latest"
bundle="$WORK/bundle"
umoci unpack --rootless --image "$LAYOUT:latest" "$bundle"
rootfs="$bundle/rootfs"
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/data"
cp "$BUSYBOX" "$rootfs/bin/busybox"
chmod 0755 "$rootfs/bin/busybox"
for applet in sh ls cat echo true false sleep env sha256sum; do
  ln -sf busybox "$rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
openssl enc -aes-256-ctr -nosalt -pass pass:regcache-bench-big200 -pbkdf2 -in /dev/zero 2>/dev/null |
  head -c "$BYTES" >"$rootfs/data/random.bin" || true
[ "$(stat -c %s "$rootfs/data/random.bin")" -eq "$BYTES" ] ||
  { echo "build-big: could not write $BYTES random bytes" >&2; exit 1; }
find "$rootfs" -exec touch -h -d "$CREATED" {} +
umoci repack --history.created "$CREATED" \
  --history.created_by "regcache-bench: COPY busybox random.bin /" --image "$LAYOUT:latest" "$bundle"
umoci config --image "$LAYOUT:latest" --no-history --created "$CREATED" \
  --architecture amd64 --os linux --config.env PATH=/bin --config.cmd /bin/sh \
  --config.label org.opencontainers.image.title=regcache-bench-big200
umoci gc --layout "$LAYOUT"
chmod -R a+rX "$LAYOUT"
date -u +%Y-%m-%dT%H:%M:%SZ >"$LAYOUT/.done"
echo "build-big: $LAYOUT:latest ready ($MIB MiB of data, single layer)" >&2
