#!/usr/bin/env bash
# Installs the external tools the integration tests need (Debian packages):
#   docker-registry (distribution 2.8, the real upstream / reference cache),
#   skopeo (real client), umoci + busybox-static (offline image fixtures),
#   etcd-server (the remote config store of the outage tests),
#   systemd (systemd-analyze, systemd-sysusers, systemd-socket-activate: the unit's checks),
#   strace (regcache serve traced against the unit's sandbox), openssl (test certificates),
#   docker.io + containerd + runc, podman + fuse-overlayfs (the real clients of tests/it/clients.rs;
#   the tests run private daemons: the packages' own services are never started here),
#   moto (PyPI moto[server], the S3-compatible server of tests/it/bucket.rs; Debian has none): installed
#   with pip into the venv /opt/regcache-moto (python3-venv), giving /opt/regcache-moto/bin/moto_server,
#   nginx (an HTTP/2 upstream: TLS with http2 in front of docker-registry; tests run a private one, the
#   package's own service is never started here).
#   Garage (crates.io garage 2.5.0, the distributed S3-compatible store the bucket tests also run on):
#   built with `cargo install --locked --root /opt/regcache-garage`, with only the features the tests
#   use (sqlite metadata, bundled C libraries; no LMDB, K2V or metrics: a quarter less to compile), no
#   system library (libsodium's bundled build wants make), giving /opt/regcache-garage/bin/garage; see
#   docs/TESTING.md for what it costs. Garage is AGPL-3.0: it is installed on the test machine only,
#   never vendored nor shipped.
#   chromium (the real browser that loads the status page headless: tests/it/status.rs),
#   prometheus (prometheus and promtool: the alert rules are checked and unit-tested, and a private
#   server scrapes regcache to evaluate every rule and dashboard expression: tests/it/status.rs). The
#   package's own service is never started (no start during the install, then masked).
# Idempotent: does nothing when every tool is already present.
set -euo pipefail

# tool:package pairs
deps=(
  "docker-registry:docker-registry"
  "skopeo:skopeo"
  "umoci:umoci"
  "busybox:busybox-static"
  "etcd:etcd-server"
  "dockerd:docker.io"
  "containerd:containerd"
  "ctr:containerd"
  "runc:runc"
  "podman:podman"
  "fuse-overlayfs:fuse-overlayfs"
  "nginx:nginx"
  "systemd-analyze:systemd"
  "strace:strace"
  "openssl:openssl"
  "chromium:chromium"
  "prometheus:prometheus"
  "promtool:prometheus"
)

# dockerd and runc live in /usr/sbin, which a non-root PATH may lack.
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing_pkgs=()
for d in "${deps[@]}"; do
  tool="${d%%:*}" pkg="${d#*:}"
  if ! have "$tool"; then
    case " ${missing_pkgs[*]-} " in *" $pkg "*) ;; *) missing_pkgs+=("$pkg") ;; esac
  fi
done
# moto lives in its own venv; creating the venv needs python3-venv (which brings python3).
MOTO_VENV=/opt/regcache-moto
MOTO_SERVER="$MOTO_VENV/bin/moto_server"
if [ ! -x "$MOTO_SERVER" ] && ! { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }; then
  case " ${missing_pkgs[*]-} " in *" python3-venv "*) ;; *) missing_pkgs+=("python3-venv") ;; esac
fi
# Garage is built from crates.io with cargo (on PATH: .ci/run puts ~/.cargo/bin there).
GARAGE_VERSION=2.5.0
GARAGE_ROOT=/opt/regcache-garage
GARAGE="$GARAGE_ROOT/bin/garage"
garage_ok() {
  [ -x "$GARAGE" ] && "$GARAGE" --version 2>/dev/null | grep -qF ":$GARAGE_VERSION "
}
if ! garage_ok && ! command -v make >/dev/null 2>&1; then
  case " ${missing_pkgs[*]-} " in *" make "*) ;; *) missing_pkgs+=("make") ;; esac
fi
# build-images.sh copies /bin/busybox into images: it must be the static build.
if command -v busybox >/dev/null 2>&1 && [ -e /bin/busybox ] && ldd /bin/busybox >/dev/null 2>&1; then
  case " ${missing_pkgs[*]-} " in *" busybox-static "*) ;; *) missing_pkgs+=("busybox-static") ;; esac
fi

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  echo "setup-deps: installing ${missing_pkgs[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  # docker.io, containerd and nginx would start system daemons (on /var/lib/docker, /run/containerd) where an
  # init system runs: forbid service starts during the install unless a policy is already in place.
  policy_added=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# added by regcache tests/setup-deps.sh for the install only\nexit 101\n' |
      $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}"
  if [ -n "$policy_added" ]; then
    $SUDO rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi
# The tests run their own Prometheus on 127.0.0.1; the package's service must never run (masked,
# as `systemctl mask` does, which also works where systemd is not running).
if [ -e /lib/systemd/system/prometheus.service ] && [ ! -L /etc/systemd/system/prometheus.service ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO mkdir -p /etc/systemd/system
  $SUDO ln -sf /dev/null /etc/systemd/system/prometheus.service
fi

if [ ! -x "$MOTO_SERVER" ]; then
  echo "setup-deps: installing moto[server] into $MOTO_VENV" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO /usr/bin/python3 -m venv "$MOTO_VENV"
  $SUDO "$MOTO_VENV/bin/pip" install -q 'moto[server]==5.2.5'
fi

if ! garage_ok; then
  echo "setup-deps: building Garage $GARAGE_VERSION (crates.io garage, AGPL-3.0) into $GARAGE_ROOT" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  if [ ! -w "$(dirname "$GARAGE_ROOT")" ] && [ ! -w "$GARAGE_ROOT" ]; then
    $SUDO mkdir -p "$GARAGE_ROOT"
    $SUDO chown "$(id -u):$(id -g)" "$GARAGE_ROOT"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "setup-deps: ERROR: cargo is not on PATH: it builds Garage ($GARAGE)" >&2
    exit 1
  fi
  started=$SECONDS
  cargo install --locked --force "garage@$GARAGE_VERSION" --root "$GARAGE_ROOT" \
    --no-default-features --features bundled-libs,sqlite
  echo "setup-deps: Garage built in $((SECONDS - started)) s" >&2
fi

rc=0
for d in "${deps[@]}"; do
  tool="${d%%:*}" pkg="${d#*:}"
  if ! have "$tool"; then
    echo "setup-deps: ERROR: '$tool' (Debian package $pkg) is still missing" >&2
    rc=1
  fi
done
if [ ! -x /bin/busybox ]; then
  echo "setup-deps: ERROR: /bin/busybox (Debian package busybox-static) is missing" >&2
  rc=1
fi
if [ ! -x "$MOTO_SERVER" ]; then
  echo "setup-deps: ERROR: $MOTO_SERVER (PyPI moto[server] in the venv $MOTO_VENV) is missing" >&2
  rc=1
fi
if ! garage_ok; then
  echo "setup-deps: ERROR: $GARAGE (crates.io garage $GARAGE_VERSION, cargo install --root $GARAGE_ROOT) is missing" >&2
  rc=1
fi
[ "$rc" -eq 0 ] && echo "setup-deps: docker-registry, skopeo, umoci, busybox, etcd, dockerd, containerd, runc, podman, nginx, chromium, prometheus, moto, garage present" >&2
exit "$rc"
