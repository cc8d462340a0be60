#!/usr/bin/env bash
# Installs the external tools the integration tests need (Debian packages):
#   docker-registry (distribution 2.8, the real upstream / reference cache),
#   skopeo (real client), umoci + busybox-static (offline image fixtures),
#   etcd-server (the remote config store of the outage tests).
# Idempotent: does nothing when every tool is already present.
set -euo pipefail

# tool:package pairs
deps=(
  "docker-registry:docker-registry"
  "skopeo:skopeo"
  "umoci:umoci"
  "busybox:busybox-static"
  "etcd:etcd-server"
)

missing_pkgs=()
for d in "${deps[@]}"; do
  tool="${d%%:*}" pkg="${d#*:}"
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing_pkgs+=("$pkg")
  fi
done
# build-images.sh copies /bin/busybox into images: it must be the static build.
if command -v busybox >/dev/null 2>&1 && [ -e /bin/busybox ] && ldd /bin/busybox >/dev/null 2>&1; then
  case " ${missing_pkgs[*]-} " in *" busybox-static "*) ;; *) missing_pkgs+=("busybox-static") ;; esac
fi

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  echo "setup-deps: installing ${missing_pkgs[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}"
fi

rc=0
for d in "${deps[@]}"; do
  tool="${d%%:*}" pkg="${d#*:}"
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup-deps: ERROR: '$tool' (Debian package $pkg) is still missing" >&2
    rc=1
  fi
done
if [ ! -x /bin/busybox ]; then
  echo "setup-deps: ERROR: /bin/busybox (Debian package busybox-static) is missing" >&2
  rc=1
fi
[ "$rc" -eq 0 ] && echo "setup-deps: docker-registry, skopeo, umoci, busybox present" >&2
exit "$rc"
