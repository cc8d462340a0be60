#!/usr/bin/env python3
"""Side-by-side benchmark of regcache against the caches users would pick instead (issue 7), plus the
outage time-to-first-byte figure of issue 3.

    python3 bench/bench.py                 # full run (about 15-20 minutes on 2 cores)
    python3 bench/bench.py --quick         # smoke run: fewer repetitions, shorter wrk runs
    python3 bench/bench.py --only tag_rps,outage

Before and after a change (issue 17): measure a git revision, store each run under a label, then render
the two side by side into docs/BENCHMARKS.md without running anything:

    python3 bench/bench.py --regcache-rev fcfe24a --label before
    python3 bench/bench.py --regcache-rev main --label after
    python3 bench/bench.py --compare before,after

The outage workload also times the first 10 cached tags after a restart with the upstream black-holed
(issue 19); `--outage-budget` bounds how long it waits for nginx, whose answers take 30 s each there.

Runs, on loopback only, against one `docker-registry` upstream seeded with a 200 MiB single-layer image
and the small images of tests/fixtures:
  - regcache (release build),
  - distribution (Debian's docker-registry) in proxy mode,
  - nginx as a caching proxy (config written here; njs joins every Accept line into the tag key),
and, where a workload needs it, the upstream itself and nginx serving the blob as a static file.
The `fleet` workload (issue 18) starts fleets of N regcache servers instead: as peers, independent, and on
one S3 bucket (moto's server: /opt/regcache-moto from tests/setup-deps.sh, else pip-installed into
bench/.work/moto-venv).

Writes bench/results/latest.json (and bench/results/NAME.json with --label), docs/bench-ratios.svg and
docs/BENCHMARKS.md (keeping the sections between the "lead notes" and the "before/after" markers of an
existing docs/BENCHMARKS.md).

Python 3.11 standard library only. Missing Debian packages are installed with apt-get (and named).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import compare  # bench/compare.py: the before/after table (--compare)
from compare import fmt

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / ".work"
RESULTS = BENCH / "results"
DOCS = ROOT / "docs"

PROXY_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}

BIG_MIB = 200
FILL_WORKERS = int(os.environ.get("BENCH_FILL_WORKERS", "48"))
BIG_REPO = "bench/big"
TAG_REPO = "library/busybox"  # the cached tag of the outage figure (Docker schema 2, as docker pulls)
OUTAGE_TAGS = 10  # tags of TAG_REPO cached before the restart of the outage figure (issue 19)
# Issue 19's target for each of them: the revalidation budget (250 ms by default) plus 50 ms.
OUTAGE_TARGET_S = 0.30

# What `docker pull` (20.10) sends for a manifest: one Accept line per media type.
DOCKER_ACCEPT = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
]

WORKLOADS = [
    "cold_pull",
    "warm_pull",
    "blob_gbps",
    "tag_rps",
    "digest_rps",
    "head_rps",
    "rss64",
    "herd16",
    "startup",
    "outage",
    "fleet",
]

CACHES = ["regcache", "distribution", "nginx"]

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def die(msg: str) -> None:
    log(f"FATAL: {msg}")
    raise SystemExit(1)


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("all_proxy",)}
    env.update(PROXY_ENV)
    return env


def run(cmd, check=True, timeout=900, **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run(
        cmd, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and cp.returncode != 0:
        die(f"`{' '.join(map(str, cmd))}` failed ({cp.returncode}):\n{cp.stderr[-3000:]}\n{cp.stdout[-2000:]}")
    return cp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- deps

NJS_MODULE_CANDIDATES = [
    "/usr/share/nginx/modules/ngx_http_js_module.so",
    "/usr/lib/nginx/modules/ngx_http_js_module.so",
]


def is_static(path: str) -> bool:
    cp = subprocess.run(["ldd", path], capture_output=True, text=True)
    return cp.returncode != 0


def ensure_deps(selected: list[str]) -> None:
    """Installs what the selected workloads need (wrk and ab only for the load workloads)."""
    tools = [("docker-registry", "docker-registry"), ("skopeo", "skopeo"), ("umoci", "umoci"),
             ("nginx", "nginx"), ("openssl", "openssl")]
    if any(w in selected for w in ("blob_gbps", "tag_rps", "digest_rps", "rss64")):
        tools.append(("wrk", "wrk"))
    if "head_rps" in selected:
        tools.append(("ab", "apache2-utils"))
    need = [pkg for tool, pkg in tools if shutil.which(tool) is None]
    if not os.path.exists("/bin/busybox") or not is_static("/bin/busybox"):
        need.append("busybox-static")
    if not any(os.path.exists(p) for p in NJS_MODULE_CANDIDATES):
        need.append("libnginx-mod-http-js")
    if need:
        log(f"installing Debian packages: {' '.join(need)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *need], env=env, check=True
        )
    for tool, _ in tools:
        if shutil.which(tool) is None:
            die(f"{tool} is still missing")
    if not os.path.exists("/bin/busybox") or not is_static("/bin/busybox"):
        die("/bin/busybox is not the static build (busybox-static)")


def njs_module() -> str | None:
    for p in NJS_MODULE_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


# ---------------------------------------------------------------------------------------- processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def proc_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += proc_children(p)
    return pids


def read_status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


class Server:
    """A child process with its logs in `home`; CPU and memory read from /proc."""

    started: list["Server"] = []  # every server this run started, stopped at exit whatever happens

    @classmethod
    def stop_all(cls) -> None:
        for srv in cls.started:
            try:
                srv.stop(grace=3.0)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass

    def __init__(self, name: str, kind: str, home: Path, port: int):
        self.name, self.kind, self.home, self.port = name, kind, home, port
        self.proc: subprocess.Popen | None = None

    @property
    def hp(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self, cmd: list[str], stdout_name="stdout.log", stderr_name="stderr.log") -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.home / stdout_name, "ab")
        err = open(self.home / stderr_name, "ab")
        self.proc = subprocess.Popen(cmd, env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        Server.started.append(self)
        out.close()
        err.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.alive() else []

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def reset_hwm(self) -> None:
        for p in self.pids():
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def hwm_kib(self) -> int:
        return sum(read_status_kib(p, "VmHWM") for p in self.pids())

    def rss_kib(self) -> int:
        return sum(read_status_kib(p, "VmRSS") for p in self.pids())

    def stop(self, sig=signal.SIGTERM, grace=5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.proc = None

    def wait_ready(self, path: str, timeout=30.0, poll=0.02) -> float:
        """Polls GET path until 200; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                die(f"{self.name} exited during startup; see {self.home}")
            st = http_status(self.port, path, timeout=1.0)
            if st == 200:
                return time.monotonic() - t0
            time.sleep(poll)
        self.stop()
        die(f"{self.name} not ready on {path} within {timeout}s; see {self.home}")
        return 0.0


def http_status(port: int, path: str, timeout=2.0, method="GET") -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except (OSError, http.client.HTTPException):
        return None


def http_get(port: int, path: str, accept: list[str] | None = None, timeout=60.0, method="GET"):
    """Returns (status, headers dict lower-cased, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.putrequest(method, path, skip_accept_encoding=True)
    for a in accept or []:
        c.putheader("Accept", a)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    headers = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    return r.status, headers, body


# ------------------------------------------------------------------------------ upstream + fixtures


def registry_yaml(storage: Path, port: int, remote: str | None) -> str:
    y = (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f'  filesystem:\n    rootdirectory: "{storage}"\n'
        "  cache:\n    blobdescriptor: inmemory\n"
        "  delete:\n    enabled: false\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-bench-secret\n"
    )
    if remote:
        y += f'proxy:\n  remoteurl: "{remote}"\n'
    return y


def start_registry(name: str, home: Path, storage: Path, remote: str | None = None, port: int | None = None) -> Server:
    for attempt in range(5):
        p = port or free_port()
        srv = Server(name, "distribution" if remote else "upstream", home, p)
        home.mkdir(parents=True, exist_ok=True)
        storage.mkdir(parents=True, exist_ok=True)
        cfg = home / "config.yml"
        cfg.write_text(registry_yaml(storage, p, remote))
        srv.spawn(["docker-registry", "serve", str(cfg)], stdout_name="access.log", stderr_name="registry.log")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            if not srv.alive():
                break
            if http_status(p, "/v2/", timeout=1.0) == 200:
                return srv
            time.sleep(0.05)
        srv.stop()
        text = (home / "registry.log").read_text(errors="replace")
        if "address already in use" in text and port is None:
            continue
        die(f"docker-registry {name} did not start:\n{text[-2000:]}")
    die("docker-registry: no free port")
    return None  # unreachable


def fixtures_key() -> str:
    h = hashlib.sha256()
    for p in [ROOT / "tests/fixtures/build-images.sh", ROOT / "tests/fixtures/seed.sh", BENCH / "build-big.sh"]:
        h.update(p.read_bytes())
    h.update(run(["docker-registry", "--version"]).stdout.encode())
    h.update(str(BIG_MIB).encode())
    return h.hexdigest()[:16]


def build_fixtures() -> Path:
    """A docker-registry storage tree seeded with the test images and bench/big:latest (cached)."""
    key = fixtures_key()
    base = WORK / f"fixtures-{key}"
    storage = base / "storage"
    if (base / ".done").is_file():
        log(f"fixtures: reusing seeded upstream storage {base}")
        return storage
    for old in WORK.glob("fixtures-*"):
        shutil.rmtree(old, ignore_errors=True)
    base.mkdir(parents=True)
    t0 = time.monotonic()
    log("fixtures: building small images (tests/fixtures/build-images.sh)")
    run(["bash", str(ROOT / "tests/fixtures/build-images.sh"), str(base / "layouts")])
    log(f"fixtures: building the {BIG_MIB} MiB single-layer image (bench/build-big.sh)")
    run(["bash", str(BENCH / "build-big.sh"), str(base / "big"), str(BIG_MIB)])
    up = start_registry("seed-upstream", base / "seed-home", storage)
    try:
        log("fixtures: seeding (tests/fixtures/seed.sh)")
        run(["bash", str(ROOT / "tests/fixtures/seed.sh"), str(base / "layouts"), up.hp])
        log(f"fixtures: pushing {BIG_REPO}:latest")
        run(
            [
                "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", "oci",
                f"oci:{base / 'big' / 'big200'}:latest", f"docker://{up.hp}/{BIG_REPO}:latest",
            ]
        )
    finally:
        up.stop()
    shutil.rmtree(base / "layouts", ignore_errors=True)
    shutil.rmtree(base / "big", ignore_errors=True)
    shutil.rmtree(base / "seed-home", ignore_errors=True)
    (base / ".done").write_text(datetime.datetime.now(datetime.timezone.utc).isoformat() + "\n")
    log(f"fixtures: ready in {time.monotonic() - t0:.1f}s")
    return storage


class Upstream:
    """The seeded docker-registry; counts the bytes it sends from its access log."""

    LINE = re.compile(r'"(GET|HEAD) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')

    def __init__(self, storage: Path, home: Path):
        self.storage, self.home = storage, home
        self.srv = start_registry("upstream", home, storage)
        self.port = self.srv.port

    @property
    def hp(self) -> str:
        return self.srv.hp

    @property
    def url(self) -> str:
        return f"http://{self.srv.hp}"

    def log_offset(self) -> int:
        try:
            return (self.home / "access.log").stat().st_size
        except OSError:
            return 0

    def entries(self, since: int) -> list[tuple[str, str, int, int]]:
        with open(self.home / "access.log", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for m in self.LINE.finditer(text):
            size = 0 if m.group(4) == "-" else int(m.group(4))
            out.append((m.group(1), m.group(2), int(m.group(3)), size))
        return out

    def blob_bytes(self, since: int, digest: str) -> tuple[int, int]:
        """(bytes sent for GET of that blob, number of such GETs) since an offset."""
        n = b = 0
        for method, path, _status, size in self.entries(since):
            if method == "GET" and path.split("?")[0].endswith("/blobs/" + digest):
                n += 1
                b += size
        return b, n

    def bytes_since(self, since: int) -> int:
        return sum(e[3] for e in self.entries(since))

    def settle(self, since: int, quiet=1.0, limit=20.0) -> None:
        """Waits until the access log stops growing (fills that finish after the clients)."""
        t0 = time.monotonic()
        last, last_change = self.log_offset(), time.monotonic()
        while time.monotonic() - t0 < limit:
            time.sleep(0.2)
            cur = self.log_offset()
            if cur != last:
                last, last_change = cur, time.monotonic()
            elif time.monotonic() - last_change >= quiet:
                return

    def stop(self) -> None:
        self.srv.stop()

    def restart(self) -> None:
        self.srv = start_registry("upstream", self.home, self.storage, port=self.port)

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# ------------------------------------------------------------------------------------------- caches

NGINX_ACCEPT_JS = """\
// Joins every Accept header line: docker and skopeo send one line per media type, and
// $http_accept holds only the first. Used in the cache key of manifests.
function all(r) {
    var out = [];
    var raw = r.rawHeadersIn;
    for (var i = 0; i < raw.length; i++) {
        if (raw[i][0].toLowerCase() === 'accept') {
            out.push(raw[i][1]);
        }
    }
    return out.join(', ');
}
export default { all };
"""


def nginx_conf(prefix: Path, port: int, upstream_port: int, tag_valid: str, static_root: Path | None,
               static_port: int | None) -> str:
    njs = njs_module()
    if njs:
        head = f"load_module {njs};\n"
        http_js = f"    js_import acc from {prefix}/accept.js;\n    js_set $accept_all acc.all;\n"
        accept_key = "$accept_all"
    else:  # documented deviation: only the first Accept line is in the key
        head = ""
        http_js = ""
        accept_key = "$http_accept"
    static = ""
    if static_root and static_port:
        static = f"""
    server {{
        listen 127.0.0.1:{static_port} reuseport;
        location /static/ {{ alias {static_root}/; }}
        location = /nginx-ready {{ return 200 "ok\\n"; }}
    }}
"""
    common = """
            proxy_pass http://registry;
"""
    return f"""{head}
user root;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$remote_addr [$time_local] "$request" $status $body_bytes_sent cache=$upstream_cache_status';
    access_log {prefix}/access.log bench;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/client;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http_js}
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=registry:32m max_size=20g inactive=30d use_temp_path=off;
    upstream registry {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_cache registry;
        proxy_cache_lock on;
        proxy_cache_lock_age 10m;
        proxy_cache_lock_timeout 10m;
        proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;
        proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
        proxy_connect_timeout 5s;
        proxy_read_timeout 30s;
        add_header X-Cache-Status $upstream_cache_status always;

        location = /nginx-ready {{ return 200 "ok\\n"; }}
        # blobs: immutable, by digest
        location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
            proxy_cache_key "$uri";
            proxy_cache_valid 200 365d;{common}        }}
        # manifests by digest: immutable; the Accept lines still pick the representation
        location ~ "^/v2/.+/manifests/sha256:[0-9a-f]{{64}}$" {{
            proxy_cache_key "$uri|{accept_key}";
            proxy_cache_valid 200 365d;{common}        }}
        # manifests by tag: short validity
        location ~ "^/v2/.+/manifests/[^/]+$" {{
            proxy_cache_key "$uri|{accept_key}";
            proxy_cache_valid 200 {tag_valid};{common}        }}
        # /v2/, tags/list, catalog, referrers: short validity
        location / {{
            proxy_cache_key "$uri$is_args$args";
            proxy_cache_valid 200 {tag_valid};{common}        }}
    }}
{static}}}
"""


class Cache:
    """One cache under test: how to start it fresh and where its state lives."""

    def __init__(self, kind: str, home: Path, upstream: Upstream, *, freshness="60s", tag_valid="60s",
                 static_root: Path | None = None):
        self.kind = kind
        self.home = home
        self.upstream = upstream
        self.freshness = freshness
        self.tag_valid = tag_valid
        self.static_root = static_root
        self.static_port: int | None = None
        self.srv: Server | None = None
        self.start_seconds = 0.0

    @property
    def name(self) -> str:
        return self.kind

    @property
    def port(self) -> int:
        return self.srv.port

    @property
    def hp(self) -> str:
        return self.srv.hp

    def start(self, fresh=True) -> "Cache":
        if fresh and self.home.exists():
            shutil.rmtree(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        if self.kind == "regcache":
            self._start_regcache()
        elif self.kind == "distribution":
            self.srv = start_registry("distribution", self.home, self.home / "storage", remote=self.upstream.url)
        elif self.kind == "nginx":
            self._start_nginx()
        else:
            raise ValueError(self.kind)
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_regcache(self) -> None:
        port = free_port()
        cfg = self.home / "regcache.toml"
        cfg.write_text(
            f'listen = "127.0.0.1:{port}"\n'
            f'data_dir = "{self.home / "data"}"\n'
            "[upstreams.bench]\n"
            f'url = "{self.upstream.url}"\n'
            f'freshness = "{self.freshness}"\n'
        )
        self.srv = Server("regcache", "regcache", self.home, port)
        self.srv.spawn([str(REGCACHE_BIN), "serve", "--config", str(cfg)])
        self.srv.wait_ready("/readyz", poll=0.005)

    def _start_nginx(self) -> None:
        port = free_port()
        self.static_port = free_port() if self.static_root else None
        for d in ["cache", "tmp/client", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"]:
            (self.home / d).mkdir(parents=True, exist_ok=True)
        (self.home / "accept.js").write_text(NGINX_ACCEPT_JS)
        conf = self.home / "nginx.conf"
        conf.write_text(nginx_conf(self.home, port, self.upstream.port, self.tag_valid, self.static_root,
                                   self.static_port))
        cp = subprocess.run(["nginx", "-t", "-p", str(self.home), "-c", str(conf)], capture_output=True, text=True)
        if cp.returncode != 0:
            die(f"nginx config invalid:\n{cp.stderr}")
        self.srv = Server("nginx", "nginx", self.home, port)
        self.srv.spawn(["nginx", "-p", str(self.home), "-c", str(conf), "-g", "daemon off; master_process on;"])
        self.srv.wait_ready("/nginx-ready")

    def stop(self) -> None:
        if self.srv:
            self.srv.stop()
            self.srv = None

    def discard(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def store_blobs(self) -> int | None:
        if self.kind != "regcache":
            return None
        try:
            _, _, body = http_get(self.port, "/metrics", timeout=10)
        except OSError:
            return None
        m = re.search(r"^regcache_store_blobs\S*\s+(\d+)", body.decode(), re.M)
        return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------- clients


def skopeo_pull(hp: str, image: str, dest: Path) -> float:
    if dest.exists():
        shutil.rmtree(dest)
    t0 = time.monotonic()
    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{hp}/{image}", f"dir:{dest}"],
        timeout=600)
    wall = time.monotonic() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return wall


def wrk_script(path: Path, method="GET", accept: list[str] | None = None) -> Path:
    lines = [f'wrk.method = "{method}"']
    if accept:
        # wrk keeps headers in a table (one value per name): the extra lines ride in the value.
        joined = "\\r\\nAccept: ".join(accept)
        lines.append(f'wrk.headers["Accept"] = "{joined}"')
    lines.append(
        """done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end"""
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, script: Path, conns: int, duration: float, timeout_s=60) -> dict:
    threads = min(2, conns)
    cp = run(
        ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--timeout", f"{timeout_s}s",
         "-s", str(script), url],
        timeout=duration + timeout_s + 30,
    )
    m = re.search(r"WRKJSON (\{.*\})", cp.stdout)
    if not m:
        die(f"wrk printed no summary:\n{cp.stdout}\n{cp.stderr}")
    r = json.loads(m.group(1))
    r["seconds"] = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / r["seconds"]
    r["gbps"] = r["bytes"] / r["seconds"] / 1e9
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return r


def ab_head(url: str, conns: int, duration: float) -> dict:
    """HEAD load with ApacheBench (`ab -i -k`): wrk 4.1 waits for a body after a HEAD response."""
    cp = run(["ab", "-q", "-k", "-i", "-c", str(conns), "-t", str(duration), "-n", "50000000", "-s", "30", url],
             timeout=duration + 60)
    out = cp.stdout

    def num(pat, default=0.0):
        m = re.search(pat, out)
        return float(m.group(1)) if m else default

    complete = int(num(r"Complete requests:\s+(\d+)"))
    failed = int(num(r"Failed requests:\s+(\d+)"))
    non2xx = int(num(r"Non-2xx responses:\s+(\d+)"))
    secs = num(r"Time taken for tests:\s+([0-9.]+)")
    if not secs:
        die(f"ab printed no summary:\n{out}\n{cp.stderr}")
    return {"requests": complete, "bytes": 0, "seconds": secs, "rps": complete / secs, "gbps": 0.0,
            "errors": failed + non2xx, "p50_us": num(r"\s50%\s+(\d+)") * 1000, "p99_us": num(r"\s99%\s+(\d+)") * 1000,
            "tool": "ab"}


def connect_then_wait(port: int, barrier: threading.Barrier | None, start_ref: list | None, timeout: float):
    """A connection to 127.0.0.1:port, opened before the barrier releases; and the common start."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.connect()
    if barrier:
        barrier.wait(timeout=60)
    return c, (start_ref[0] if start_ref else time.monotonic())


def timed_get(port: int, path: str, out: dict, expect_size: int, barrier: threading.Barrier | None = None,
              start_ref: list | None = None, timeout=300.0) -> None:
    """GET path; records seconds (from the common start) to headers, first body byte, last byte."""
    try:
        c, t0 = connect_then_wait(port, barrier, start_ref, timeout)
        c.putrequest("GET", path, skip_accept_encoding=True)
        c.endheaders()
        r = c.getresponse()
        out["headers"] = time.monotonic() - t0
        out["status"] = r.status
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        n = r.readinto(mv[:1])
        out["first_byte"] = time.monotonic() - t0
        total = n
        while True:
            n = r.readinto(mv)
            if not n:
                break
            total += n
        out["done"] = time.monotonic() - t0
        out["bytes"] = total
        out["ok"] = r.status == 200 and total == expect_size
        c.close()
    except Exception as e:  # noqa: BLE001 - reported, counted as a failure
        out["error"] = repr(e)
        out["ok"] = False


def on_threads(target, jobs: list[tuple], join_timeout: float) -> None:
    """target(*job) for every job, each on a thread, all at once; returns when they ended (or at the timeout)."""
    threads = [threading.Thread(target=target, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout)


def together(target, jobs: list[tuple], join_timeout=900.0) -> None:
    """target(*job, barrier=…, start_ref=…) for every job, each on a thread, released at the same moment by
    a barrier (their connections already open); the times they record count from that moment."""
    barrier = threading.Barrier(len(jobs) + 1)
    start_ref: list = []
    threads = [threading.Thread(target=target, args=job, kwargs={"barrier": barrier, "start_ref": start_ref})
               for job in jobs]
    for t in threads:
        t.start()
    start_ref.append(time.monotonic())
    barrier.wait(timeout=60)
    for t in threads:
        t.join(timeout=join_timeout)


def ttfb(port: int, path: str, accept: list[str], cap: float) -> dict:
    """Time to the first byte of the response (status line) of GET path, capped; then the status."""
    t0 = time.monotonic()
    res = {"status": None, "warning": None}
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=cap)
        req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: docker/20.10.24\r\n"
        req += "".join(f"Accept: {a}\r\n" for a in accept) + "Connection: close\r\n\r\n"
        s.sendall(req.encode())
        s.settimeout(max(0.001, cap - (time.monotonic() - t0)))
        first = s.recv(1)
        if not first:
            res["seconds"] = time.monotonic() - t0
            res["error"] = "closed without answer"
            return res
        res["seconds"] = time.monotonic() - t0
        data = first
        s.settimeout(5)
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head = data.split(b"\r\n\r\n")[0].decode(errors="replace").split("\r\n")
        res["status"] = int(head[0].split()[1])
        for h in head[1:]:
            if h.lower().startswith("warning:"):
                res["warning"] = h.split(":", 1)[1].strip()
        s.close()
    except socket.timeout:
        res["seconds"] = None
        res["timeout"] = True
    except OSError as e:
        res["seconds"] = time.monotonic() - t0
        res["error"] = repr(e)
    return res


# ------------------------------------------------------------------------------------- fake upstream


class FakeBlobUpstream:
    """A tiny registry serving N small blobs (for the 100 000-blob store); loopback only."""

    def __init__(self, n: int):
        self.blobs = {}
        for i in range(n):
            data = f"regcache-bench-blob-{i:06d}\n".encode()
            self.blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
        blobs = self.blobs

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, body_ok: bool):
                path = self.path.split("?")[0]
                if path == "/v2/" or path == "/v2":
                    data, status, ctype = b"{}", 200, "application/json"
                else:
                    d = path.rsplit("/", 1)[-1]
                    data = blobs.get(d) if "/blobs/" in path else None
                    status, ctype = (200, "application/octet-stream") if data else (404, "application/json")
                    if data is None:
                        data = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}'
                    else:
                        self._digest = d
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if status == 200 and "/blobs/" in path:
                    self.send_header("Docker-Content-Digest", path.rsplit("/", 1)[-1])
                self.end_headers()
                if body_ok:
                    self.wfile.write(data)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class BlackHole:
    """Listens on a port, accepts connections, and never answers (bounded in count)."""

    def __init__(self, port: int, max_conns=2000):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self.max_conns = max_conns
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if len(self.conns) < self.max_conns:
                self.conns.append(c)
            else:
                c.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()


# --------------------------------------------------------------------------------------------- fleet

FLEET_SETUPS = ["peers", "independent", "bucket"]
FLEET_TOKEN = "regcache-bench-fleet-token-0123456789abcdef"
# The small images of tests/fixtures/seed.sh: server i of a fleet also pulls FLEET_SMALL[i % 5], so that
# each is held by some servers only when the upstream goes dark.
FLEET_SMALL = ["small/oci:latest", "small/docker:latest", "library/busybox:latest", "multi/oci:latest",
               "multi/docker:latest"]
FLEET_PULL_TIMEOUT = 90.0  # seconds for one request of a pull while the upstream is black-holed
MOTO_SERVERS = ["/opt/regcache-moto/bin/moto_server"]  # where tests/setup-deps.sh installs moto
# moto checks no signature; it wants an Authorization header of the AWS form.
MOTO_AUTH = ("AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, "
             "Signature=x")
MOTO_BUCKET = "regcache-bench"


def http_req(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"", timeout=30.0):
    """(status, headers lower-cased, body) of one request to 127.0.0.1:port, or None when it fails."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    except (OSError, http.client.HTTPException):
        return None


def metrics(port: int) -> dict[str, float]:
    """regcache's /metrics as {'name{labels}': value} (empty when it does not answer)."""
    r = http_req(port, "GET", "/metrics", timeout=10)
    out: dict[str, float] = {}
    if not r or r[0] != 200:
        return out
    for line in r[2].decode(errors="replace").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def metric_sum(m: dict[str, float], name: str, label: str | None = None) -> dict[str, float] | float:
    """Sum of a metric over its series; by the value of `label` when given."""
    if label is None:
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.startswith(name + "{"):
            lm = re.search(label + r'="([^"]*)"', k)
            key = lm.group(1) if lm else "?"
            out[key] = out.get(key, 0.0) + v
    return out


def moto_server_bin() -> str:
    """moto_server: the one tests/setup-deps.sh installs, else a venv under bench/.work (pip, PyPI)."""
    for p in MOTO_SERVERS:
        if os.access(p, os.X_OK):
            return p
    venv = WORK / "moto-venv"
    binary = venv / "bin" / "moto_server"
    if not binary.exists():
        log("fleet: installing moto[server] into bench/.work/moto-venv (pip from PyPI)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # pip needs the network: the real environment, not the dead proxy the servers get.
        cp = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "moto[server]"])
        if cp.returncode != 0 or not binary.exists():
            die("pip install 'moto[server]' failed; install it (tests/setup-deps.sh does) or retry")
    return str(binary)


class Moto:
    """moto's S3 server on loopback (in memory) with the bench's bucket."""

    def __init__(self, home: Path):
        binary = moto_server_bin()
        for _ in range(3):
            port = free_port()
            self.srv = Server("moto", "moto", home, port)
            env_cmd = [binary, "-H", "127.0.0.1", "-p", str(port)]
            self.srv.spawn(env_cmd, stdout_name="moto.log", stderr_name="moto.err")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60 and self.srv.alive():
                r = http_req(port, "GET", "/", {"Authorization": MOTO_AUTH}, timeout=2)
                if r and r[0] == 200:
                    break
                time.sleep(0.1)
            else:
                self.srv.stop()
                continue
            r = http_req(port, "PUT", f"/{MOTO_BUCKET}", {"Authorization": MOTO_AUTH}, timeout=10)
            if not r or r[0] != 200:
                die(f"moto: cannot create bucket {MOTO_BUCKET}: {r and r[:1]}")
            self.port = port
            return
        die(f"moto_server did not start; see {home}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.srv.stop()


class Unsupported(Exception):
    """The regcache under test does not accept a setup's configuration (an older revision)."""


class Fleet:
    """N regcache servers on 127.0.0.1 (distinct ports, a data directory each) in one setup: `peers`
    (`[peers]` listing all of them), `independent` (nothing shared) or `bucket` (`[store.s3]` on one moto
    bucket)."""

    def __init__(self, setup: str, n: int, home: Path, upstream: Upstream, moto: Moto | None):
        self.setup, self.n, self.home, self.upstream, self.moto = setup, n, home, upstream, moto
        self.servers: list[Server] = []
        self.ports: list[int] = []

    def config(self, i: int, urls: list[str], token: Path) -> str:
        t = (f'listen = "127.0.0.1:{self.ports[i]}"\n'
             f'data_dir = "{self.home / f"data-{i}"}"\n'
             "[upstreams.bench]\n"
             f'url = "{self.upstream.url}"\n'
             # Longer than the whole workload: the outage pulls find every tag a server holds fresh, so
             # what they measure is which server holds what, not revalidations.
             'freshness = "10m"\n')
        if self.setup == "peers":
            t += "[peers]\nurls = [" + ", ".join(f'"{u}"' for u in urls) + "]\n"
            t += f'token_file = "{token}"\n'
        if self.setup == "bucket":
            t += ("[store.s3]\n"
                  f'bucket = "{MOTO_BUCKET}"\n'
                  f'endpoint = "{self.moto.url}"\n'
                  f'prefix = "fleet-{self.n}"\n'
                  'region = "us-east-1"\n'
                  'access_key_id = "test"\n'
                  'secret_access_key = "test"\n')
        return t

    def start(self) -> "Fleet":
        if self.home.exists():
            shutil.rmtree(self.home)
        self.home.mkdir(parents=True)
        while len(self.ports) < self.n:
            p = free_port()
            if p not in self.ports:
                self.ports.append(p)
        urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        token = self.home / "peer-token"
        token.write_text(FLEET_TOKEN + "\n")
        token.chmod(0o600)
        for i in range(self.n):
            cfg = self.home / f"regcache-{i}.toml"
            cfg.write_text(self.config(i, urls, token))
            cfg.chmod(0o600)
            if i == 0:
                cp = subprocess.run([str(REGCACHE_BIN), "check-config", str(cfg)], capture_output=True, text=True,
                                    env=child_env(), timeout=60)
                if cp.returncode != 0:
                    raise Unsupported((cp.stderr or cp.stdout).strip().splitlines()[-1:] or ["exit 2"])
            srv = Server(f"regcache-{self.setup}-{i}", "regcache", self.home / f"srv-{i}", self.ports[i])
            srv.spawn([str(REGCACHE_BIN), "serve", "--config", str(cfg)])
            self.servers.append(srv)
        for srv in self.servers:
            srv.wait_ready("/readyz", timeout=60)
        if self.setup == "peers":
            self.wait_formed()
        return self

    def wait_formed(self, within=40.0) -> None:
        """Until every server sees every other one up in /readyz."""
        t0 = time.monotonic()
        for srv in self.servers:
            while True:
                r = http_req(srv.port, "GET", "/readyz", timeout=5)
                peers = json.loads(r[2]).get("peers", []) if r and r[0] == 200 else []
                if peers and all(p.get("up") or p.get("self") for p in peers):
                    break
                if time.monotonic() - t0 > within:
                    die(f"fleet: {srv.name} does not see its peers up within {within:.0f}s: {peers}")
                time.sleep(0.1)

    def metrics(self) -> list[dict[str, float]]:
        return [metrics(p) for p in self.ports]

    def wait_bucket_written(self, limit=300.0) -> float:
        """Until no server owes the bucket a write (and the bytes written stopped growing); seconds waited."""
        t0 = time.monotonic()
        last, since = None, time.monotonic()
        while time.monotonic() - t0 < limit:
            ms = self.metrics()
            pending = sum(metric_sum(m, "regcache_bucket_pending_writes") for m in ms)
            written = sum(metric_sum(m, "regcache_bucket_written_bytes_total") for m in ms)
            if written != last:
                last, since = written, time.monotonic()
            elif pending == 0 and time.monotonic() - since >= 2.0:
                return time.monotonic() - t0
            time.sleep(0.25)
        log(f"fleet: the bucket writes did not settle within {limit:.0f}s")
        return time.monotonic() - t0

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()
        # the data directories hold N copies of the image; the logs stay in bench/.work/run for a look
        for i in range(self.n):
            shutil.rmtree(self.home / f"data-{i}", ignore_errors=True)


def pull(port: int, image: str, out: dict, barrier: threading.Barrier | None = None, start_ref: list | None = None,
         timeout=300.0) -> None:
    """A client's pull over HTTP, as docker does it: the manifest by tag with docker's Accept lines (an index
    or list: then its linux/amd64 manifest by digest), then the config and layer blobs at once, each read to
    its end. Records seconds from the common start to the manifest, to the first body byte of the largest
    blob, and to the end of the last; ok when every answer was 200 with the announced sizes."""
    repo, tag = image.rsplit(":", 1)
    try:
        c, t0 = connect_then_wait(port, barrier, start_ref, timeout)
        ref = tag
        for _ in range(2):
            c.putrequest("GET", f"/v2/{repo}/manifests/{ref}", skip_accept_encoding=True)
            for a in DOCKER_ACCEPT:
                c.putheader("Accept", a)
            c.endheaders()
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                out.update(ok=False, error=f"manifest {repo}:{ref} -> {r.status}", manifest_s=time.monotonic() - t0)
                return
            man = json.loads(body)
            if "manifests" not in man:
                break
            ref = next((d["digest"] for d in man["manifests"]
                        if d.get("platform", {}).get("architecture") == "amd64"), man["manifests"][0]["digest"])
        c.close()
        out["manifest_s"] = time.monotonic() - t0
        blobs = [man["config"]] + man["layers"]
        outs = [dict() for _ in blobs]
        ths = [threading.Thread(target=timed_get, args=(port, f"/v2/{repo}/blobs/{b['digest']}", o, b["size"]),
                                kwargs={"start_ref": [t0], "timeout": timeout})
               for b, o in zip(blobs, outs)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        largest = max(range(len(blobs)), key=lambda i: blobs[i]["size"])
        out["first_byte_s"] = outs[largest].get("first_byte")
        out["done_s"] = max((o.get("done") or 0.0) for o in outs)
        out["bytes"] = sum(o.get("bytes") or 0 for o in outs)
        out["ok"] = all(o.get("ok") for o in outs)
        if not out["ok"]:
            bad = [(b["digest"][:19], o.get("status"), o.get("error")) for b, o in zip(blobs, outs) if not o.get("ok")]
            out["error"] = f"blobs {bad}"
    except Exception as e:  # noqa: BLE001 - reported, counted as a failure
        out["ok"] = False
        out["error"] = repr(e)


# -------------------------------------------------------------------------------------------- bench


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


# The workloads that use the long-running caches started by Bench.setup (the others start their own).
MAIN_CACHE_USERS = {"warm_pull", "blob_gbps", "tag_rps", "digest_rps", "head_rps", "rss64", "startup"}


class Bench:
    def __init__(self, args, selected: list[str]):
        self.args = args
        self.selected = selected
        self.quick = args.quick
        self.reps = 1 if args.quick else 3
        self.wrk_seconds = 2 if args.quick else 4
        self.results: dict = {"workloads": {}}
        self.run_dir = WORK / "run"
        self.pull_dir = Path("/dev/shm/regcache-bench-pulls") if shm_ok() else WORK / "pulls"
        self.main: dict[str, Cache] = {}
        self.warmed: set[str] = set()

    # -- setup
    def setup(self) -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        self.pull_dir.mkdir(parents=True, exist_ok=True)
        storage = build_fixtures()
        self.upstream = Upstream(storage, self.run_dir / "upstream")
        st, h, body = http_get(self.upstream.port, f"/v2/{BIG_REPO}/manifests/latest",
                               accept=["application/vnd.oci.image.manifest.v1+json"])
        if st != 200:
            die(f"upstream does not serve {BIG_REPO}:latest ({st})")
        man = json.loads(body)
        if len(man["layers"]) != 1:
            die(f"{BIG_REPO}:latest has {len(man['layers'])} layers, expected 1")
        self.big_manifest_digest = h["docker-content-digest"]
        self.big_blob = man["layers"][0]["digest"]
        self.big_size = man["layers"][0]["size"]
        self.big_config = man["config"]["digest"]
        self.big_config_size = man["config"]["size"]
        self.blob_path = f"/v2/{BIG_REPO}/blobs/{self.big_blob}"
        log(f"upstream {self.upstream.hp}: {BIG_REPO}:latest layer {self.big_blob[:19]}… "
            f"{self.big_size / 2**20:.1f} MiB")
        self.results["fixture"] = {
            "image": f"{BIG_REPO}:latest",
            "manifest_digest": self.big_manifest_digest,
            "layer_digest": self.big_blob,
            "layer_bytes": self.big_size,
        }
        if not any(w in self.selected for w in MAIN_CACHE_USERS):
            return
        static_root = self.upstream.storage / "docker/registry/v2/blobs/sha256"
        for kind in CACHES:
            c = Cache(kind, self.run_dir / f"main-{kind}", self.upstream,
                      static_root=static_root if kind == "nginx" else None)
            c.start()
            self.main[kind] = c
            log(f"{kind} on {c.hp}")

    def teardown(self) -> None:
        for c in self.main.values():
            c.stop()
            # the cached copies are 200+ MiB each; the logs stay in bench/.work/run for a look after the run
            for bulky in ("data", "storage", "cache"):
                shutil.rmtree(c.home / bulky, ignore_errors=True)
        if hasattr(self, "upstream"):
            self.upstream.stop()
        shutil.rmtree(self.pull_dir, ignore_errors=True)

    def fresh(self, kind: str, tag: str, **kw) -> Cache:
        return Cache(kind, self.run_dir / f"{tag}-{kind}", self.upstream, **kw).start()

    def warm(self, c: Cache) -> None:
        if c.kind in self.warmed:
            return
        skopeo_pull(c.hp, f"{BIG_REPO}:latest", self.pull_dir / f"warm-{c.kind}")
        for path, acc in [
            (f"/v2/{BIG_REPO}/manifests/latest", DOCKER_ACCEPT),
            (f"/v2/{BIG_REPO}/manifests/{self.big_manifest_digest}", DOCKER_ACCEPT),
            (self.blob_path, None),
        ]:
            for method in ("GET", "HEAD") if "/blobs/" in path else ("GET",):
                st, _, _ = http_get(c.port, path, accept=acc, method=method, timeout=300)
                if st != 200:
                    die(f"warming {c.kind}: {method} {path} -> {st}")
        self.warmed.add(c.kind)

    @contextlib.contextmanager
    def upstream_black_holed(self):
        """The upstream stopped and its port taken by a BlackHole; restarted after."""
        self.upstream.stop()
        hole = BlackHole(self.upstream.port)
        try:
            yield
        finally:
            hole.stop()
            self.upstream.restart()

    def record(self, name: str, data: dict) -> None:
        self.results["workloads"][name] = data

    # -- workloads
    def w_cold_pull(self) -> None:
        targets = ["upstream"] + CACHES
        runs = {t: [] for t in targets}
        fetched = {t: [] for t in targets}
        n = 1 if self.quick else 5
        for rep in range(n):
            for t in rotated(targets, rep):
                if t == "upstream":
                    off = self.upstream.log_offset()
                    wall = skopeo_pull(self.upstream.hp, f"{BIG_REPO}:latest", self.pull_dir / "cold")
                else:
                    c = self.fresh(t, "cold")
                    off = self.upstream.log_offset()
                    wall = skopeo_pull(c.hp, f"{BIG_REPO}:latest", self.pull_dir / "cold")
                    self.upstream.settle(off, quiet=0.5, limit=10)
                    c.discard()
                b, _ = self.upstream.blob_bytes(off, self.big_blob)
                runs[t].append(wall)
                fetched[t].append(b / self.big_size)
                log(f"cold_pull rep {rep + 1}/{n} {t:12s} {wall:6.2f}s  layer fetched {b / self.big_size:.2f}x")
        self.record("cold_pull", {
            "unit": "s", "better": "lower", "runs": runs, "median": {t: med(v) for t, v in runs.items()},
            "layer_fetches": {t: med(v) for t, v in fetched.items()},
        })

    def w_warm_pull(self) -> None:
        targets = ["upstream"] + CACHES
        for k in CACHES:
            self.warm(self.main[k])
        n = 2 if self.quick else 5
        runs = {t: [] for t in targets}
        for rep in range(n):
            for t in rotated(targets, rep):
                hp = self.upstream.hp if t == "upstream" else self.main[t].hp
                wall = skopeo_pull(hp, f"{BIG_REPO}:latest", self.pull_dir / "warm")
                runs[t].append(wall)
                log(f"warm_pull rep {rep + 1}/{n} {t:12s} {wall:6.2f}s")
        self.record("warm_pull", {"unit": "s", "better": "lower", "runs": runs,
                                  "median": {t: med(v) for t, v in runs.items()}})

    def _wrk_targets(self, workload: str, path: str, method: str, accept, conns: int, include_static=False):
        script = wrk_script(self.run_dir / f"{workload}.lua", method=method, accept=accept)
        for k in CACHES:
            self.warm(self.main[k])
        targets = list(CACHES) + (["nginx-static"] if include_static else [])
        runs = {t: [] for t in targets}
        for rep in range(self.reps):
            for t in rotated(targets, rep):
                if t == "nginx-static":
                    srv = self.main["nginx"].srv
                    hexd = self.big_blob.split(":", 1)[1]
                    url = f"http://127.0.0.1:{self.main['nginx'].static_port}/static/{hexd[:2]}/{hexd}/data"
                else:
                    srv = self.main[t].srv
                    url = f"http://{srv.hp}{path}"
                srv.reset_hwm()
                rss0 = srv.rss_kib()
                cpu0 = srv.cpu()
                if method == "HEAD":
                    r = ab_head(url, conns, self.wrk_seconds)
                else:
                    r = wrk(url, script, conns, self.wrk_seconds)
                r["cpu_s"] = srv.cpu() - cpu0
                r["hwm_mib"] = srv.hwm_kib() / 1024
                r["rss_before_mib"] = rss0 / 1024
                r["cpu_s_per_gb"] = r["cpu_s"] / (r["bytes"] / 1e9) if r["bytes"] else None
                runs[t].append(r)
                log(f"{workload} rep {rep + 1}/{self.reps} {t:12s} {r['rps']:10.1f} req/s {r['gbps']:6.2f} GB/s "
                    f"cpu {r['cpu_s']:.2f}s peak {r['hwm_mib']:.0f} MiB errors {r['errors']}")
        return runs

    def w_blob_gbps(self) -> None:
        runs = self._wrk_targets("blob_gbps", self.blob_path, "GET", None, 8, include_static=True)
        self.record("blob_gbps", {
            "unit": "GB/s", "better": "higher", "runs": runs,
            "median": {t: med([r["gbps"] for r in v if not r["errors"]]) for t, v in runs.items()},
            "errors": {t: sum(r["errors"] for r in v) for t, v in runs.items()},
        })
        # CPU seconds per GB served warm, from the same runs
        self.record("cpu_per_gb", {
            "unit": "CPU s/GB", "better": "lower", "source": "blob_gbps runs (server user+sys / GB sent)",
            "median": {t: med([r["cpu_s_per_gb"] for r in v]) for t, v in runs.items()},
        })

    def _rps(self, name: str, path: str, method: str, accept) -> None:
        runs = self._wrk_targets(name, path, method, accept, 16)
        self.record(name, {
            "unit": "req/s", "better": "higher", "runs": runs,
            "median": {t: med([r["rps"] for r in v]) for t, v in runs.items()},
            "errors": {t: sum(r["errors"] for r in v) for t, v in runs.items()},
            "p99_ms": {t: med([r["p99_us"] / 1000 for r in v]) for t, v in runs.items()},
        })

    def w_tag_rps(self) -> None:
        self._rps("tag_rps", f"/v2/{BIG_REPO}/manifests/latest", "GET", DOCKER_ACCEPT)

    def w_digest_rps(self) -> None:
        self._rps("digest_rps", f"/v2/{BIG_REPO}/manifests/{self.big_manifest_digest}", "GET", DOCKER_ACCEPT)

    def w_head_rps(self) -> None:
        self._rps("head_rps", self.blob_path, "HEAD", None)

    def w_rss64(self) -> None:
        runs = self._wrk_targets("rss64", self.blob_path, "GET", None, 64)
        self.record("rss64", {
            "unit": "MiB", "better": "lower", "runs": runs,
            "median": {t: med([r["hwm_mib"] for r in v]) for t, v in runs.items()},
            "max": {t: max(r["hwm_mib"] for r in v) for t, v in runs.items()},
            "gbps": {t: med([r["gbps"] for r in v]) for t, v in runs.items()},
            "errors": {t: sum(r["errors"] for r in v) for t, v in runs.items()},
        })

    def _herd_once(self, kind: str, clients: int) -> dict:
        c = self.fresh(kind, f"herd{clients}")
        try:
            off = self.upstream.log_offset()
            outs = [dict() for _ in range(clients)]
            together(timed_get, [(c.port, self.blob_path, o, self.big_size) for o in outs], join_timeout=600)
            self.upstream.settle(off, quiet=1.0, limit=60)
            fetched, n_gets = self.upstream.blob_bytes(off, self.big_blob)
            warm_wall = None
            if clients > 1:
                # the same herd again, now warm: the delivery floor of 16 x 200 MiB on this machine
                wouts = [dict() for _ in range(clients)]
                together(timed_get, [(c.port, self.blob_path, o, self.big_size) for o in wouts], join_timeout=600)
                if all(o.get("ok") for o in wouts):
                    warm_wall = max(o["done"] for o in wouts)
        finally:
            c.discard()
        ok = all(o.get("ok") for o in outs)
        firsts = [o.get("first_byte") for o in outs]
        dones = [o.get("done") for o in outs]
        res = {
            "clients": clients, "ok": ok,
            "errors": [o.get("error") or o.get("status") for o in outs if not o.get("ok")],
            "upstream_bytes": fetched, "upstream_gets": n_gets, "upstream_copies": fetched / self.big_size,
            "ttfb_s": firsts, "done_s": dones,
            "ttfb_max": max(x for x in firsts if x is not None) if any(x is not None for x in firsts) else None,
            "ttfb_median": med(firsts),
            "first_done": min(x for x in dones if x is not None) if any(x is not None for x in dones) else None,
            "wall": max(x for x in dones if x is not None) if any(x is not None for x in dones) else None,
            "warm_wall": warm_wall,
        }
        return res

    def w_herd16(self) -> None:
        runs = {k: [] for k in CACHES}
        singles = {k: [] for k in CACHES}
        for rep in range(self.reps):
            for k in rotated(CACHES, rep):
                one = self._herd_once(k, 1)
                singles[k].append(one["wall"])
                r = self._herd_once(k, 16)
                runs[k].append(r)
                log(f"herd16 rep {rep + 1}/{self.reps} {k:12s} one client {one['wall']:.2f}s | 16 clients wall "
                    f"{r['wall']:.2f}s ttfb max {r['ttfb_max']:.2f}s first done {r['first_done']:.2f}s "
                    f"upstream {r['upstream_copies']:.2f}x ({r['upstream_gets']} GETs) ok={r['ok']} | "
                    f"same 16 warm {r['warm_wall'] or 0:.2f}s")
        summary = {}
        for k in CACHES:
            rs = runs[k]
            summary[k] = {
                "upstream_copies": med([r["upstream_copies"] for r in rs]),
                "upstream_copies_max": max(r["upstream_copies"] for r in rs),
                "ttfb_max": med([r["ttfb_max"] for r in rs]),
                "ttfb_median": med([r["ttfb_median"] for r in rs]),
                "first_done": med([r["first_done"] for r in rs]),
                "all_first_bytes_before_fill_done": all(
                    r["ttfb_max"] is not None and r["first_done"] is not None and r["ttfb_max"] < r["first_done"]
                    for r in rs),
                "wall": med([r["wall"] for r in rs]),
                "one_client_wall": med(singles[k]),
                "warm_wall": med([r["warm_wall"] for r in rs]),
                "all_ok": all(r["ok"] for r in rs),
            }
            s = summary[k]
            s["wall_vs_one"] = s["wall"] / s["one_client_wall"] if s["wall"] and s["one_client_wall"] else None
        self.record("herd16", {"runs": runs, "one_client_runs": singles, "summary": summary})

    def w_startup(self) -> None:
        reg = self.main["regcache"]
        n_blobs = reg.store_blobs()
        times = []
        for _ in range(self.reps):
            reg.stop()
            reg.start(fresh=False)
            times.append(reg.start_seconds)
        log(f"startup: regcache store of this run ({n_blobs} blobs): start to ready {med(times) * 1000:.0f} ms")
        data = {"unit": "s", "better": "lower",
                "this_run_store": {"blobs": n_blobs, "runs": times, "median": med(times)}}
        if not self.args.skip_100k:
            data["store_100k"] = self._startup_100k()
        self.record("startup", data)

    def _startup_100k(self) -> dict:
        n = self.args.blobs_100k
        home = WORK / f"store-{n}"
        marker = home / ".done"
        built = None
        cache = Cache("regcache", home, None)  # upstream set below
        if marker.is_file() and not self.args.rebuild_store:
            info = json.loads(marker.read_text())
            built = f"reused (built {info.get('built')} in {info.get('fill_seconds', 0):.0f} s)"
        fake = FakeBlobUpstream(n)
        try:
            cache.upstream = fake  # has .url, .port
            if built is None:
                log(f"startup: filling a regcache store with {n} blobs through a fake upstream (once; cached)")
                shutil.rmtree(home, ignore_errors=True)
                cache.start(fresh=True)
                t0 = time.monotonic()
                digests = list(fake.blobs)
                errors = []
                deadline = t0 + self.args.fill_limit
                lock = threading.Lock()
                idx = [0]

                def worker():
                    conn = http.client.HTTPConnection("127.0.0.1", cache.port, timeout=60)
                    while time.monotonic() < deadline:
                        with lock:
                            i = idx[0]
                            idx[0] += 1
                        if i >= len(digests):
                            return
                        d = digests[i]
                        try:
                            conn.request("GET", f"/v2/fill/blobs/{d}")
                            r = conn.getresponse()
                            body = r.read()
                            if r.status != 200 or body != fake.blobs[d]:
                                errors.append((d, r.status))
                        except (OSError, http.client.HTTPException) as e:
                            errors.append((d, repr(e)))
                            conn.close()
                            conn = http.client.HTTPConnection("127.0.0.1", cache.port, timeout=60)
                        if i % 10000 == 0 and i:
                            log(f"startup: filled {i}/{n} ({time.monotonic() - t0:.0f}s)")

                ws = [threading.Thread(target=worker) for _ in range(FILL_WORKERS)]
                for w in ws:
                    w.start()
                for w in ws:
                    w.join()
                fill = time.monotonic() - t0
                count = cache.store_blobs()
                cache.stop()
                if idx[0] < len(digests) or errors or (count or 0) < n:
                    log(f"startup: store fill incomplete: {min(idx[0], n)}/{n} requested, {len(errors)} errors, "
                        f"{count} blobs in store after {fill:.0f}s")
                    return {"blobs": count, "error": "fill incomplete", "fill_seconds": fill,
                            "first_errors": errors[:5]}
                marker.write_text(json.dumps({"built": datetime.datetime.now().isoformat(timespec="seconds"),
                                              "fill_seconds": fill, "blobs": count}))
                built = f"built in this run ({fill:.0f} s through a fake upstream)"
                log(f"startup: store of {count} blobs filled in {fill:.0f}s")
            if "reused" in built:
                try:
                    cache.start(fresh=False)
                    count = cache.store_blobs()
                    cache.stop()
                except SystemExit:
                    count = None
                if (count or 0) < n:
                    log(f"startup: the cached store does not serve {n} blobs ({count}); rebuilding it")
                    cache.stop()
                    marker.unlink(missing_ok=True)
                    self.args.rebuild_store = True
                    fake.stop()
                    return self._startup_100k()
            times = []
            count = None
            for _ in range(self.reps):
                cache.start(fresh=False)
                times.append(cache.start_seconds)
                count = cache.store_blobs()
                cache.stop()
            log(f"startup: {count} cached blobs: start to ready {med(times) * 1000:.0f} ms ({built})")
            return {"blobs": count, "runs": times, "median": med(times), "store": built}
        finally:
            cache.stop()
            fake.stop()

    def _outage_tags(self) -> list[str]:
        """OUTAGE_TAGS tags of TAG_REPO in the upstream (`bench-01` …): its `latest` manifest put under each
        name (idempotent), so that each is a tag of its own in every cache."""
        st, h, body = http_get(self.upstream.port, f"/v2/{TAG_REPO}/manifests/latest", accept=DOCKER_ACCEPT)
        if st != 200:
            die(f"outage: upstream does not serve {TAG_REPO}:latest ({st})")
        tags = [f"bench-{i:02d}" for i in range(1, OUTAGE_TAGS + 1)]
        for t in tags:
            r = http_req(self.upstream.port, "PUT", f"/v2/{TAG_REPO}/manifests/{t}",
                         {"Content-Type": h["content-type"]}, body)
            if not r or r[0] not in (200, 201):
                die(f"outage: cannot tag {TAG_REPO}:{t} in the upstream: {r and r[0]} {r and r[2][:300]!r}")
        return tags

    def _outage_restart(self) -> dict:
        """The first OUTAGE_TAGS cached tags after a restart with the upstream black-holed (issue 19)."""
        cap, budget = self.args.ttfb_cap, self.args.outage_budget
        tags = self._outage_tags()
        caches = {k: self.fresh(k, "outage-restart", freshness="1s", tag_valid="1s") for k in CACHES}
        results: dict = {}
        try:
            for k, c in caches.items():
                for t in tags:
                    r = ttfb(c.port, f"/v2/{TAG_REPO}/manifests/{t}", DOCKER_ACCEPT, 10)
                    if r.get("status") != 200:
                        die(f"outage: caching {TAG_REPO}:{t} through {k} failed: {r}")
            for c in caches.values():
                c.stop()
            log(f"outage: {len(tags)} tags cached by every cache, caches stopped; black-holing the upstream")
            with self.upstream_black_holed():
                time.sleep(2.5)  # past regcache's 1 s freshness and nginx's 1 s tag validity

                def measure(k: str, c: Cache):
                    if k == "distribution":
                        started = self._restart_distribution(c, cap)
                    else:
                        c.start(fresh=False)
                        started = {"started": True, "start_s": c.start_seconds}
                    res = dict(started, tags=[])
                    results[k] = res
                    if not started["started"]:
                        return
                    spent = 0.0
                    for t in tags:
                        if spent >= budget:
                            break
                        r = ttfb(c.port, f"/v2/{TAG_REPO}/manifests/{t}", DOCKER_ACCEPT, cap)
                        r["tag"] = t
                        res["tags"].append(r)
                        spent += r["seconds"] if r.get("seconds") is not None else cap

                on_threads(measure, list(caches.items()), budget + 2 * cap + 120)
        finally:
            for c in caches.values():
                c.discard()
        summary = {}
        for k in CACHES:
            r = results.get(k, {"started": False, "start_error": "not measured (thread did not finish)"})
            ts = r.get("tags", [])
            secs = [x["seconds"] if x.get("seconds") is not None else math.inf for x in ts]
            s = {
                "started": r["started"], "start_error": r.get("start_error"), "start_s": r.get("start_s"),
                "asked": len(ts), "not_asked": len(tags) - len(ts) if r["started"] else len(tags),
                "seconds": [x.get("seconds") for x in ts],
                "statuses": [x.get("status") for x in ts],
                "warnings": [x.get("warning") for x in ts],
                "timeouts": sum(1 for x in ts if x.get("timeout")),
                "max_s": max(secs) if secs else None,
                "sum_s": sum(secs) if secs and len(ts) == len(tags) else None,
                "sum_asked_s": sum(secs) if secs else None,
            }
            summary[k] = s
            if s["started"]:
                log(f"outage restart {k:12s} {s['asked']} tags: " + ", ".join(fmt_ttfb(x, cap) for x in secs) +
                    (f" ({s['not_asked']} not asked: {budget:.0f} s budget spent)" if s["not_asked"] else ""))
            else:
                log(f"outage restart {k:12s} did not start: {s['start_error']}")
        return {"tags": [f"{TAG_REPO}:{t}" for t in tags], "budget_s": budget, "cap_s": cap, "summary": summary}

    def _restart_distribution(self, c: Cache, wait: float) -> dict:
        """distribution in proxy mode on its old storage with the upstream black-holed: whether it starts (it
        asks its remote's /v2/ when it starts), and how it fails when it does not; then the same with a remote
        that refuses connections, for contrast."""
        res = self._start_distribution(c, c.upstream.url, wait, keep=True)
        if not res["started"]:
            closed = free_port()  # nothing listens there: connections are refused
            refused = self._start_distribution(c, f"http://127.0.0.1:{closed}", min(wait, 10.0), keep=False)
            res["start_error"] += f". With a remote that refuses connections instead: {refused['start_error']}"
        return res

    def _start_distribution(self, c: Cache, remote: str, wait: float, keep: bool) -> dict:
        port = free_port()
        cfg = c.home / "config.yml"
        # info: what it logs while it starts
        cfg.write_text(registry_yaml(c.home / "storage", port, remote).replace("level: warn", "level: info"))
        logf = c.home / "registry.log"
        off = logf.stat().st_size if logf.exists() else 0
        srv = Server("distribution", "distribution", c.home, port)
        t0 = time.monotonic()
        srv.spawn(["docker-registry", "serve", str(cfg)], stdout_name="access.log", stderr_name="registry.log")

        def tail() -> str:
            with open(logf, "rb") as f:
                f.seek(off)
                lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
            last = next((x for x in lines if x.startswith("panic:")), None) or (lines[-1] if lines else "")
            return re.sub(r" go\.version=.*$", "", last)[-400:] or "(nothing logged)"

        while time.monotonic() - t0 < wait:
            if not srv.alive():
                code = srv.proc.returncode if srv.proc else None
                srv.stop()
                return {"started": False,
                        "start_error": f"exited with status {code} after {time.monotonic() - t0:.1f} s: {tail()}"}
            if http_status(port, "/v2/", timeout=1.0) == 200:
                if keep:
                    c.srv = srv
                else:
                    srv.stop()
                return {"started": True, "start_s": time.monotonic() - t0}
            time.sleep(0.1)
        srv.stop()
        return {"started": False,
                "start_error": f"no answer on /v2/ within {wait:.0f} s, the process running (stopped then by the "
                               f"bench); its last log line: {tail()}"}

    def w_outage(self) -> None:
        cap = self.args.ttfb_cap
        n_follow = 3 if self.quick else 8
        budget = 60.0  # seconds of follow-up requests per cache (they run in parallel across caches)
        path = f"/v2/{TAG_REPO}/manifests/latest"
        caches = {}
        for k in CACHES:
            caches[k] = self.fresh(k, "outage", freshness="1s", tag_valid="1s")
        try:
            for k, c in caches.items():
                for _ in range(2):
                    r = ttfb(c.port, path, DOCKER_ACCEPT, 10)
                    if r.get("status") != 200:
                        die(f"outage: warming {k} with {path} failed: {r}")
            log("outage: tag warmed through every cache; black-holing the upstream")
            results = {}
            with self.upstream_black_holed():
                time.sleep(2.5)  # past regcache's 1 s freshness and nginx's 1 s tag validity

                def measure(k: str, c: Cache):
                    first = ttfb(c.port, path, DOCKER_ACCEPT, cap)
                    follow = []
                    spent, timeouts_in_row = 0.0, 1 if first.get("timeout") else 0
                    for _ in range(n_follow):
                        if spent >= budget or timeouts_in_row >= 2:
                            break
                        r = ttfb(c.port, path, DOCKER_ACCEPT, cap)
                        follow.append(r)
                        spent += r["seconds"] if r.get("seconds") is not None else cap
                        timeouts_in_row = timeouts_in_row + 1 if r.get("timeout") else 0
                    results[k] = {"first": first, "following": follow}

                on_threads(measure, list(caches.items()), cap * (n_follow + 2) + 60)
        finally:
            for c in caches.values():
                c.discard()
        summary = {}
        for k, r in results.items():
            f = r["following"]
            secs = [x["seconds"] if x.get("seconds") is not None else math.inf for x in f]
            summary[k] = {
                "first_s": r["first"].get("seconds"),
                "first_status": r["first"].get("status"),
                "first_warning": r["first"].get("warning"),
                "first_timeout": bool(r["first"].get("timeout")),
                "following_n": len(f),
                "following_median_s": statistics.median(secs) if secs else None,
                "following_timeouts": sum(1 for x in f if x.get("timeout")),
                "following_statuses": sorted({x.get("status") for x in f if x.get("status")}),
                "following_s": [x.get("seconds") for x in f],
            }
            log(f"outage {k:12s} first {fmt_ttfb(summary[k]['first_s'], cap)} (status {summary[k]['first_status']}) "
                f"| following {len(f)}: median {fmt_ttfb(summary[k]['following_median_s'], cap)}")
        restart = self._outage_restart()
        self.record("outage", {"cap_s": cap, "path": path, "follow_max": n_follow, "accept": DOCKER_ACCEPT, "runs": results,
                               "summary": summary, "regcache_freshness": "1s", "nginx_tag_validity": "1s",
                               "restart": restart})

    def w_fleet(self) -> None:
        sizes = ([int(x) for x in self.args.fleet_sizes.split(",") if x] if self.args.fleet_sizes
                 else [2, 4] if self.quick else [2, 4, 8])
        image = f"{BIG_REPO}:latest"
        image_bytes = self.big_size + self.big_config_size
        data: dict = {"image": image, "image_bytes": image_bytes, "small_images": FLEET_SMALL,
                      "pull_timeout_s": FLEET_PULL_TIMEOUT, "sizes": {}}
        for k, n in enumerate(sizes):
            by: dict = {}
            fleets: dict[str, Fleet] = {}
            moto = None
            try:
                for setup in rotated(FLEET_SETUPS, k):
                    if setup == "bucket":
                        moto = Moto(self.run_dir / f"fleet{n}-moto")
                    fleet = Fleet(setup, n, self.run_dir / f"fleet{n}-{setup}", self.upstream, moto)
                    try:
                        fleet.start()
                    except Unsupported as e:
                        fleet.stop()
                        by[setup] = {"unsupported": " ".join(e.args[0])}
                        log(f"fleet N={n} {setup:12s} not supported by this regcache: {by[setup]['unsupported']}")
                        continue
                    fleets[setup] = fleet
                    by[setup] = self._fleet_herd(fleet, image, image_bytes)
                self._fleet_outage(fleets, by, image)
            finally:
                for f in fleets.values():
                    f.stop()
                if moto:
                    moto.stop()
            data["sizes"][str(n)] = by
        self.record("fleet", data)

    def _fleet_herd(self, fleet: Fleet, image: str, image_bytes: int) -> dict:
        """One client per server, all pulling `image` cold at the same moment; the upstream's blob bytes."""
        n = fleet.n
        off = self.upstream.log_offset()
        outs = [dict() for _ in range(n)]
        together(pull, [(port, image, o) for port, o in zip(fleet.ports, outs)])
        self.upstream.settle(off, quiet=1.0, limit=60)
        sent = [(path, status, size) for method, path, status, size in self.upstream.entries(off)
                if method == "GET" and "/blobs/" in path]
        up_bytes = sum(size for _, _, size in sent)
        ms = fleet.metrics()
        fills: dict[str, float] = {}
        for m in ms:
            for src, v in metric_sum(m, "regcache_fills_total", "source").items():
                fills[src] = fills.get(src, 0) + v
        walls = [o.get("done_s") for o in outs]
        firsts = [o.get("first_byte_s") for o in outs]
        mans = [o.get("manifest_s") for o in outs]
        res = {
            "n": n, "ok": all(o.get("ok") for o in outs), "ok_each": [bool(o.get("ok")) for o in outs],
            "errors": [o.get("error") for o in outs if not o.get("ok")],
            "upstream_bytes": up_bytes, "upstream_x": up_bytes / image_bytes, "upstream_gets": len(sent),
            "wall_s": walls, "first_byte_s": firsts, "manifest_s": mans,
            "wall_max": max((x for x in walls if x is not None), default=None),
            "wall_median": med(walls),
            "first_byte_max": max((x for x in firsts if x is not None), default=None),
            "manifest_max": max((x for x in mans if x is not None), default=None),
            "fills": fills,
            "peer_received_bytes": sum(metric_sum(m, "regcache_peer_received_bytes_total") for m in ms),
        }
        log(f"fleet N={n} {fleet.setup:12s} slowest client {fmt(res['wall_max'], 's')} s, slowest first byte "
            f"{fmt(res['first_byte_max'], 's')} s, upstream blob bytes {res['upstream_x']:.2f}x "
            f"({res['upstream_gets']} GETs), fills {dict(sorted(fills.items()))}, ok={res['ok']}")
        return res

    def _fleet_outage(self, fleets: dict[str, "Fleet"], by: dict, image: str) -> None:
        """Server i also pulls FLEET_SMALL[i % 5]; then, with the upstream black-holed, every server of every
        setup pulls every image some server of its setup holds, all at once."""
        held: dict[str, dict[str, list[int]]] = {}
        for setup, fleet in fleets.items():
            outs = [dict() for _ in range(fleet.n)]
            imgs = [FLEET_SMALL[i % len(FLEET_SMALL)] for i in range(fleet.n)]
            on_threads(pull, list(zip(fleet.ports, imgs, outs)), 300)
            h: dict[str, list[int]] = {image: [i for i, ok in enumerate(by[setup]["ok_each"]) if ok]}
            for i, o in enumerate(outs):
                if o.get("ok"):
                    h.setdefault(imgs[i], []).append(i)
                else:
                    log(f"fleet {setup}: server {i} could not pull {imgs[i]} with the upstream up: {o.get('error')}")
            held[setup] = h
            if setup == "bucket":
                by[setup]["bucket_wait_s"] = fleet.wait_bucket_written()
        if not fleets:
            return
        jobs = [(setup, i, img, {}) for setup, fleet in fleets.items() for i in range(fleet.n) for img in held[setup]]
        with self.upstream_black_holed():
            t0 = time.monotonic()
            on_threads(lambda s, i, img, o: pull(fleets[s].ports[i], img, o, timeout=FLEET_PULL_TIMEOUT), jobs,
                       FLEET_PULL_TIMEOUT * 4 + 60)
            phase = time.monotonic() - t0
        for setup, fleet in fleets.items():
            mine = [(i, img, o) for s, i, img, o in jobs if s == setup]
            ok = [x for x in mine if x[2].get("ok")]
            res = {
                "held": held[setup],
                "pulls": len(mine), "pullable": len(ok),
                "pullable_pct": 100.0 * len(ok) / len(mine) if mine else None,
                "slowest_ok_s": max((o["done_s"] for _, _, o in ok), default=None),
                "failed": [{"server": i, "image": img, "error": o.get("error"),
                            "after_s": o.get("done_s") or o.get("manifest_s")} for i, img, o in mine
                           if not o.get("ok")],
                "phase_s": phase,
            }
            by[setup]["outage"] = res
            log(f"fleet N={fleet.n} {setup:12s} upstream black-holed: {len(ok)}/{len(mine)} pulls of the "
                f"{len(held[setup])} images held by some server succeed ({res['pullable_pct']:.0f} %), slowest "
                f"{fmt(res['slowest_ok_s'], 's')} s")


def fmt_ttfb(s, cap) -> str:
    if s is None or s == math.inf:
        return f"> {cap:.0f} s (timeout)"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def shm_ok() -> bool:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize > 2 * 2**30
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- targets


def evaluate(res: dict) -> list[dict]:
    """Rows: workload, measure, values, ratios regcache/ref, per-ratio targets (for the chart), target, met."""
    W = res["workloads"]
    rows = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    def le(x, t):
        return x is not None and x <= t

    def ge(x, t):
        return x is not None and x >= t

    def row(workload, short, measure, unit, values, ratios, targets, target, met, note=""):
        """targets: {ref: (op, threshold)} for the ratios that have one; the others are informative."""
        rows.append({"workload": workload, "short": short, "measure": measure, "unit": unit, "values": values,
                     "ratios": ratios, "ratio_targets": targets, "target": target, "met": bool(met), "note": note})

    if "cold_pull" in W:
        m = W["cold_pull"]["median"]
        rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["upstream", "distribution", "nginx"]}
        tg = {"upstream": ("<=", 1.05), "distribution": ("<=", 1.0), "nginx": ("<=", 1.0)}
        row("cold pull, 200 MiB image (skopeo to dir)", "cold pull", "wall time", "s", m, rs, tg,
            "≤ 1.05 × upstream; ≤ distribution; ≤ nginx", all(le(rs[k], t) for k, (_, t) in tg.items()))
    if "warm_pull" in W:
        m = W["warm_pull"]["median"]
        rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["upstream", "distribution", "nginx"]}
        tg = {"distribution": ("<=", 0.8), "nginx": ("<=", 1.0)}
        row("warm pull, same image", "warm pull", "wall time", "s", m, rs, tg, "≤ 0.8 × distribution; ≤ nginx",
            all(le(rs[k], t) for k, (_, t) in tg.items()))
    if "blob_gbps" in W:
        m = W["blob_gbps"]["median"]
        rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["nginx-static", "distribution", "nginx"]}
        tg = {"nginx-static": (">=", 0.95)}
        row("warm blob GET, 8 parallel clients (wrk)", "blob GB/s, 8 clients", "throughput", "GB/s", m, rs, tg,
            "≥ 0.95 × nginx static file (sendfile)",
            ge(rs["nginx-static"], 0.95) and not W["blob_gbps"]["errors"].get("regcache"))
    if "herd16" in W:
        s = W["herd16"]["summary"]
        r = s["regcache"]
        vals = {k: s[k]["upstream_copies"] for k in s}
        row("16 clients at once, cold, one 200 MiB blob", "herd: upstream copies", "blob copies fetched upstream",
            "×", vals, {k: ratio(vals["regcache"], vals[k]) for k in ["distribution", "nginx"]}, {},
            "exactly 1 × the blob",
            r["upstream_copies_max"] is not None and abs(r["upstream_copies_max"] - 1) < 1e-6
            and abs((r["upstream_copies"] or 0) - 1) < 1e-6)
        vals = {k: s[k]["ttfb_max"] for k in s}
        row("", "herd: slowest 1st byte", "slowest client's first byte", "s", vals,
            {k: ratio(vals["regcache"], vals[k]) for k in ["distribution", "nginx"]}, {},
            "every first byte before the fill completes", r["all_first_bytes_before_fill_done"],
            note="first client done (≈ fill complete): " +
            ", ".join(f"{k} {s[k]['first_done']:.2f} s" for k in s if s[k]['first_done']))
        vals = {k: s[k]["wall"] for k in s}
        row("", "herd: wall", "wall, 16 clients", "s", vals,
            {k: ratio(vals["regcache"], vals[k]) for k in ["distribution", "nginx"]}, {},
            "≤ 1.2 × one cold client", le(r["wall_vs_one"], 1.2),
            note="one cold client alone: " + ", ".join(f"{k} {s[k]['one_client_wall']:.2f} s" for k in s
                                                       if s[k]['one_client_wall']) +
            (f" (regcache 16 clients / 1 client = {r['wall_vs_one']:.2f})" if r["wall_vs_one"] else "") +
            "; the same 16 clients again once warm, i.e. the delivery floor of 16 × 200 MiB on this machine: " +
            ", ".join(f"{k} {s[k]['warm_wall']:.2f} s" for k in s if s[k].get('warm_wall')))
    for name, label, short in [("tag_rps", "manifest by tag, in freshness window (wrk, 16 conns)", "tag req/s"),
                               ("digest_rps", "manifest by digest (wrk, 16 conns)", "digest req/s"),
                               ("head_rps", "HEAD of a blob (ab -k, 16 conns)", "blob HEAD req/s")]:
        if name in W:
            m = W[name]["median"]
            rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["distribution", "nginx"]}
            tg = {"nginx": (">=", 1.0)}
            row(label, short, "requests/s", "req/s", m, rs, tg, "≥ nginx",
                ge(rs["nginx"], 1.0) and not W[name]["errors"].get("regcache"))
    if "rss64" in W:
        m = W["rss64"]["median"]
        mx = W["rss64"]["max"]
        rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["distribution", "nginx"]}
        row("64 concurrent warm streams of the 200 MiB blob", "peak RSS, 64 streams", "peak RSS of the server",
            "MiB", m, rs, {}, "≤ 64 MiB", le(m["regcache"], 64),
            note="highest peak of the runs: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mx.items() if v is not None))
    if "startup" in W:
        st = W["startup"]
        big = st.get("store_100k") or {}
        vals = {"regcache": big.get("median")}
        note = (f"on the store left by this run ({st['this_run_store']['blobs']} blobs): "
                f"{st['this_run_store']['median'] * 1000:.0f} ms")
        if big.get("blobs") is not None:
            note = f"{big['blobs']} blobs in the store ({big.get('store')}); " + note
        if big.get("error"):
            note = f"100k store: {big['error']}; " + note
        row("start to ready with 100 000 cached blobs", "start to ready", "seconds", "s", vals, {}, {}, "≤ 1 s",
            le(big.get("median"), 1.0) and (big.get("blobs") or 0) >= 100000, note=note)
    if "cpu_per_gb" in W:
        m = W["cpu_per_gb"]["median"]
        rs = {ref: ratio(m["regcache"], m[ref]) for ref in ["distribution", "nginx", "nginx-static"]}
        tg = {"distribution": ("<=", 0.5), "nginx": ("<=", 1.0)}
        row("CPU per GB served warm (from the 8-client runs)", "CPU s / GB served", "CPU s (user+sys) / GB", "s/GB",
            m, rs, tg, "≤ 0.5 × distribution; ≤ nginx", all(le(rs[k], t) for k, (_, t) in tg.items()))
    rs = (W.get("outage") or {}).get("restart")
    if rs:
        S = rs["summary"]
        vals = {k: S[k]["max_s"] for k in S if S[k]["started"] and S[k]["asked"]}
        r = S.get("regcache", {})
        row(f"cached tags after a restart, upstream black-holed (first {len(rs['tags'])}, one after another)",
            "outage: 10 tags after restart", "slowest answer (first byte)", "s", vals,
            {k: ratio(vals.get("regcache"), v) for k, v in vals.items() if k != "regcache"}, {},
            f"every one ≤ {OUTAGE_TARGET_S:.2f} s (revalidate_budget 250 ms + 50 ms)",
            r.get("started") and r.get("asked") == len(rs["tags"]) and set(r.get("statuses", [])) == {200}
            and le(r.get("max_s"), OUTAGE_TARGET_S),
            note="answers one after another: " + "; ".join(
                f"{k} " + (", ".join(fmt_ttfb(x, rs["cap_s"]) for x in S[k]["seconds"]) +
                           (f" ({S[k]['not_asked']} not asked)" if S[k]["not_asked"] else "")
                           if S[k]["started"] else "did not start")
                for k in S))
    if "fleet" in W:
        fl = W["fleet"]
        peers = {n: by.get("peers") or {} for n, by in fl["sizes"].items()}
        indep = {n: by.get("independent") or {} for n, by in fl["sizes"].items()}
        ns = ", ".join(sorted(fl["sizes"], key=int))
        ran = {n: p for n, p in peers.items() if "upstream_bytes" in p}
        if ran:
            worst = max(ran.values(), key=lambda p: abs(p["upstream_x"] - 1))
            row(f"fleet herd, N = {ns} servers as peers, one client each, cold", "fleet: upstream bytes",
                "upstream blob bytes, × the image (worst N)", "×", {"regcache": worst["upstream_x"]}, {}, {},
                "exactly 1.00 × for every N",
                len(ran) == len(peers) and all(p["upstream_bytes"] == fl["image_bytes"] and p["ok"] for p in ran.values()),
                note="per N: " + ", ".join(f"{n} peers {p['upstream_x']:.2f}" for n, p in sorted(ran.items(), key=lambda kv: int(kv[0]))))
            ratios = {n: ratio(p.get("wall_max"), indep[n].get("wall_max")) for n, p in ran.items()}
            known = [r for r in ratios.values() if r is not None]
            row("", "fleet: slowest client", "slowest client, peers / independent (worst N)", "×",
                {"regcache": max(known) if known else None}, {"independent": max(known) if known else None},
                {"independent": ("<=", 1.0)}, "≤ N independent servers, for every N",
                bool(known) and len(known) == len(peers) and all(r <= 1.0 for r in known),
                note="slowest client per N, peers vs independent: " + ", ".join(
                    f"{n}: {fmt(p.get('wall_max'), 's')} s vs {fmt(indep[n].get('wall_max'), 's')} s"
                    for n, p in sorted(ran.items(), key=lambda kv: int(kv[0]))))
            pcts = {n: (p.get("outage") or {}).get("pullable_pct") for n, p in ran.items()}
            known = [x for x in pcts.values() if x is not None]
            row("", "fleet: pullable in an outage", "upstream black-holed: pulls that succeed of every image any "
                "server holds, on every server (worst N)", "%", {"regcache": min(known) if known else None}, {}, {},
                "100 %", bool(known) and len(known) == len(peers) and all(x == 100.0 for x in known),
                note="per N and setup: " + "; ".join(
                    f"{n}: " + ", ".join(f"{s} {(r.get('outage') or {}).get('pullable_pct') or 0:.0f} %"
                                         for s, r in by.items() if r.get("outage"))
                    for n, by in sorted(fl["sizes"].items(), key=lambda kv: int(kv[0]))))
        elif peers:
            why = next((p.get("unsupported") for p in peers.values() if p.get("unsupported")), "not run")
            row(f"fleet herd, N = {ns} servers as peers", "fleet", "peers setup", "", {}, {}, {},
                "exactly 1.00 × upstream; ≤ independent; 100 % pullable", False,
                note=f"peers not supported by this regcache: {why}")
    return rows


# ------------------------------------------------------------------------------------------ output


def build_label(build: dict) -> str:
    """`fcfe24a (subject), commit date`, and where it was built."""
    if not build.get("short"):
        return "?"
    where = (f"worktree of `{build.get('rev')}` under bench/.work" if build.get("source") == "worktree"
             else "this checkout" + (" (src modified)" if build.get("modified") else ""))
    return f"{build['short']} ({build.get('subject', '')}), committed {build.get('commit_date', '?')}; {where}"


def machine_info() -> dict:
    def first(path, key):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def ver(cmd):
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (cp.stdout + cp.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    flags = first("/proc/cpuinfo", "flags") or ""
    mem_kb = int((first("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                           capture_output=True, text=True)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "cpu": first("/proc/cpuinfo", "model name"),
        "sha_ni": "sha_ni" in flags.split(),
        "debian": Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else None,
        "python": platform.python_version(),
        "regcache": ver([str(REGCACHE_BIN), "--version"]),
        "git": git.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else ""),
        "regcache_commit": build_label(BUILD),
        "docker-registry": ver(["docker-registry", "--version"]),
        "nginx": ver(["nginx", "-v"]),
        "njs": "yes" if njs_module() else "no (deviation: $http_accept, first Accept line only)",
        "skopeo": ver(["skopeo", "--version"]),
        "wrk": ver(["wrk", "--version"]),
    }


def svg_chart(rows: list[dict], path: Path) -> None:
    """Horizontal bars of regcache / reference on a log scale: green where that ratio meets its target, red where
    it misses, grey where the ratio has no target of its own (informative); a black tick marks the target."""
    bars = []
    for r in rows:
        for ref, v in r["ratios"].items():
            if v is None or v <= 0 or v == math.inf:
                continue
            tgt = r["ratio_targets"].get(ref)
            if tgt is None:
                state = None
            else:
                op, t = tgt
                state = v <= t if op == "<=" else v >= t
            better = "higher" if r["unit"] in ("GB/s", "req/s") else "lower"
            bars.append((r["short"], ref, v, state, tgt, better))
    lo, hi = 0.01, 100.0
    if bars:
        lo = min(lo, min(b[2] for b in bars) / 1.5)
        hi = max(hi, max(b[2] for b in bars) * 1.5)
    lo = 10 ** math.floor(math.log10(lo))
    hi = 10 ** math.ceil(math.log10(hi))
    W, left, right, top, bh, gap = 1000, 330, 30, 78, 18, 6
    plot_w = W - left - right
    H = top + len(bars) * (bh + gap) + 64

    def x(v):
        return left + (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_w

    def esc(s):
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
           'regcache / reference, per workload (log scale)</text>',
           f'<text x="{W / 2}" y="42" text-anchor="middle" fill="#555">(↓) time, RSS, CPU, copies: lower is better · '
           '(↑) GB/s, req/s: higher is better</text>',
           f'<text x="{W / 2}" y="60" text-anchor="middle" fill="#555">green: meets its target · red: misses it · '
           'grey: no target on this ratio · black tick: target</text>']
    d = lo
    while d <= hi * 1.0001:
        for mult in (1, 2, 5):
            v = d * mult
            if lo <= v <= hi * 1.0001:
                xv = x(v)
                out.append(f'<line x1="{xv:.1f}" y1="{top - 8}" x2="{xv:.1f}" y2="{H - 50}" '
                           f'stroke="{"#333" if v == 1 else "#e3e3e3"}" stroke-width="{1.5 if v == 1 else 1}"/>')
                out.append(f'<text x="{xv:.1f}" y="{H - 36}" text-anchor="middle" fill="#555">{v:g}</text>')
        d *= 10
    prev = None
    for i, (short, ref, v, state, tgt, better) in enumerate(bars):
        y = top + i * (bh + gap)
        if prev is not None and prev != short:
            out.append(f'<line x1="10" y1="{y - gap / 2:.1f}" x2="{W - 10}" y2="{y - gap / 2:.1f}" stroke="#f0f0f0"/>')
        arrow = "↑" if better == "higher" else "↓"
        label = f"{short} {arrow}" if short != prev else ""
        prev = short
        if label:
            out.append(f'<text x="10" y="{y + bh - 5}" font-weight="bold">{esc(label)}</text>')
        out.append(f'<text x="{left - 8}" y="{y + bh - 5}" text-anchor="end" fill="#333">vs {esc(ref)}</text>')
        x1, xv = x(1.0), x(v)
        color = {True: "#2e9d4a", False: "#d2453a", None: "#9e9e9e"}[state]
        out.append(f'<rect x="{min(x1, xv):.1f}" y="{y}" width="{max(1.0, abs(xv - x1)):.1f}" height="{bh}" '
                   f'fill="{color}" fill-opacity="0.85"/>')
        if tgt is not None:
            xt = x(tgt[1])
            out.append(f'<line x1="{xt:.1f}" y1="{y - 2}" x2="{xt:.1f}" y2="{y + bh + 2}" stroke="black" '
                       'stroke-width="2"/>')
        tx = max(xv, x1) + 5 if v >= 1 else min(xv, x1) - 5
        anchor = "start" if v >= 1 else "end"
        out.append(f'<text x="{tx:.1f}" y="{y + bh - 5}" text-anchor="{anchor}" fill="#222">{v:.2f}×</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{H - 14}" text-anchor="middle" fill="#555">'
               'ratio regcache / reference</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


LEAD_BEGIN = "<!-- BEGIN lead notes: kept as is when bench/bench.py rewrites this file -->"
LEAD_END = "<!-- END lead notes -->"
LEAD_DEFAULT = """## Where the time goes (TODO: lead)

_To be filled in by the lead after profiling (perf, valgrind --tool=callgrind): where regcache spends its
time in each workload it misses, what was changed, and what remains. This section is kept when
`bench/bench.py` rewrites the file._
"""


def write_markdown(res: dict, rows: list[dict], path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    lead = LEAD_DEFAULT
    before_after = compare.extract(old)
    if LEAD_BEGIN in old and LEAD_END in old:
        lead = old.split(LEAD_BEGIN, 1)[1].split(LEAD_END, 1)[0].strip("\n") + "\n"
    m = res["machine"]
    W = res["workloads"]
    L = []
    L.append("# Benchmarks\n")
    L.append("Written by `bench/bench.py` (do not edit by hand, except the lead-notes section at the end).\n")
    L.append("## Command\n")
    L.append(f"```\n{res['command']}\n```\n")
    L.append(f"Run on {res['date']} in {res['total_seconds'] / 60:.1f} min (including `cargo build --release`)"
             f"{' (**--quick** smoke run: 1 repetition, short wrk runs — not a measured result)' if res['quick'] else ''}"
             f"{' (only: ' + ', '.join(res['only']) + ')' if res['only'] else ''}.\n")
    L.append("It installs what is missing (Debian: docker-registry, skopeo, umoci, busybox-static, nginx, "
             "libnginx-mod-http-js, wrk, apache2-utils), builds regcache (`cargo build --release`) and the fixtures (the small images "
             "of `tests/fixtures/build-images.sh` and a 200 MiB single-layer image from `bench/build-big.sh`, "
             "seeded once into a `docker-registry` upstream and cached under `bench/.work/`), starts the upstream, "
             "regcache, distribution in proxy mode and nginx as a caching proxy side by side on loopback, and runs "
             "each workload several times, alternating the caches (cold runs on fresh cache directories).\n")
    L.append("Flags of `bench/bench.py`:\n")
    L += flags_doc()
    L.append("")
    if res["quick"]:
        L.append("Repetitions (--quick): 1 of each, wrk/ab runs of 2 s, 3 outage follow-ups.\n")
    else:
        L.append("Repetitions: cold pulls 5 per target, warm pulls 5, each wrk/ab workload 3 runs of 4 s per target, "
                 "the 16-client herd 3 per cache (each with a one-client run), start to ready 3, outage 1 + up to 8 "
                 "follow-up requests, the fleet once per N and setup.\n")
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    for k, label in [("nproc", "cores (nproc)"), ("memory_gib", "memory (GiB)"), ("cpu", "CPU"),
                     ("sha_ni", "SHA extensions (sha_ni)"), ("kernel", "kernel"), ("debian", "Debian"),
                     ("regcache", "regcache"), ("regcache_commit", "regcache built from"),
                     ("git", "git commit of the checkout"), ("docker-registry", "distribution"),
                     ("nginx", "nginx"), ("njs", "njs (Accept key)"), ("skopeo", "skopeo"), ("wrk", "wrk"),
                     ("python", "python")]:
        if k in m:
            L.append(f"| {label} | {fmt(m[k]) if isinstance(m[k], bool) else m[k]} |")
    L.append("\nThe machine is shared (2 cores); the load generators (skopeo, wrk, ab, Python clients) run on the "
             "same cores as the servers, and other work may run beside them: load average "
             f"{res.get('loadavg_before', '?')} at the start, {res.get('loadavg_after', '?')} at the end (1, 5, 15 min).\n")
    L.append("## Results\n")
    L.append("Medians. Ratio = regcache / reference (for times, memory, CPU and copies lower is better; for GB/s "
             "and req/s higher is better). Chart: [bench-ratios.svg](bench-ratios.svg).\n")
    L.append("![ratios](bench-ratios.svg)\n")
    cols = ["regcache", "distribution", "nginx", "upstream", "nginx-static"]
    L.append("| workload | measure | " + " | ".join(cols) + " | regcache / ref | target | met |")
    L.append("|---|---|" + "---|" * len(cols) + "---|---|---|")
    for r in rows:
        vals = " | ".join(fmt(r["values"].get(c), r["unit"]) if c in r["values"] else "" for c in cols)
        rs = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items() if v is not None) or "–"
        met = "**yes**" if r["met"] else "**NO**"
        L.append(f"| {r['workload']} | {r['measure']} ({r['unit']}) | {vals} | {rs} | {r['target']} | {met} |")
    L.append("")
    notes = [r for r in rows if r["note"]]
    if notes:
        for r in notes:
            L.append(f"- {r['workload'] or r['measure']}: {r['note']}")
        L.append("")
    spread = run_spread(W)
    if spread:
        L.append("Run-to-run spread, min – max of the runs behind each median (the machine is shared, so read "
                 "differences smaller than the spread as noise):\n")
        L.append("| workload | " + " | ".join(cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for name, unit, by in spread:
            L.append(f"| {name} ({unit}) | " + " | ".join(
                f"{fmt(by[c][0], unit)} – {fmt(by[c][1], unit)}" if c in by else "" for c in cols) + " |")
        L.append("")
    if "cold_pull" in W:
        lf = W["cold_pull"]["layer_fetches"]
        L.append("Layer copies fetched from the upstream per cold pull (median): " +
                 ", ".join(f"{k} {v:.2f}" for k, v in lf.items() if v is not None) + ".\n")
    for name in ["tag_rps", "digest_rps", "head_rps", "blob_gbps", "rss64"]:
        if name in W and any(W[name].get("errors", {}).values()):
            L.append(f"- {name}: wrk counted errors (non-2xx, timeouts, socket errors): "
                     + ", ".join(f"{k} {v}" for k, v in W[name]["errors"].items() if v) + "\n")
    if "tag_rps" in W:
        p99 = W["tag_rps"]["p99_ms"]
        L.append("p99 latency of manifest by tag (ms): " +
                 ", ".join(f"{k} {v:.2f}" for k, v in p99.items() if v is not None) + ".\n")

    L.append("## Outage: time to first byte of a cached tag, upstream black-holed (issue 3)\n")
    if "outage" in W:
        o = W["outage"]
        cap = o["cap_s"]
        L.append(f"Each cache (fresh) is warmed with `GET {o['path']}` through it, then the upstream is stopped and "
                 "its port taken by a listener that accepts connections and never answers. After 2.5 s (past "
                 "regcache's `freshness = \"1s\"` and nginx's 1 s tag validity; distribution asks the upstream on "
                 "every tag request anyway), the same client measures, for each cache at the same time, the time to "
                 "the first byte of the response to `GET` of the tag with the six `Accept` lines docker sends, "
                 f"capped at {cap:.0f} s: the first request, then up to {o.get('follow_max', 8)} more one after another "
                 "(stopping after two timeouts in a row or 60 s of them).\n")
        L.append("| cache | first request | status | following requests (median) | n | statuses | each following request |")
        L.append("|---|---|---|---|---|---|---|")
        for k, s in o["summary"].items():
            st = s["first_status"] if s["first_status"] else "–"
            if s["first_warning"]:
                st = f"{st} (Warning: {s['first_warning']})"
            L.append(f"| {k} | {fmt_ttfb(s['first_s'], cap)} | {st} | "
                     f"{fmt_ttfb(s['following_median_s'], cap) if s['following_n'] else '–'} | {s['following_n']} | "
                     f"{', '.join(map(str, s['following_statuses'])) or '–'} | "
                     f"{', '.join(fmt_ttfb(x, cap) for x in s.get('following_s', [])) or '–'} |")
        L.append("")
        L.append("Settings that decide these numbers: regcache defaults (`connect_timeout = \"5s\"`, which also "
                 "bounds the revalidation of a cached tag; `header_timeout = \"30s\"`; breaker after 3 failures); "
                 "nginx `proxy_connect_timeout 5s; proxy_read_timeout 30s;` with `proxy_cache_use_stale error "
                 "timeout …`; distribution 2.8 has no upstream timeout.\n")
        rs = o.get("restart")
        if rs:
            cap, budget = rs["cap_s"], rs["budget_s"]
            S = rs["summary"]
            L.append(f"### After a restart: the first {len(rs['tags'])} cached tags (issue 19)\n")
            L.append(f"Each cache (fresh; regcache `freshness = \"1s\"`, nginx 1 s tag validity) caches {len(rs['tags'])} tags "
                     f"(`{rs['tags'][0]}` … `{rs['tags'][-1]}`, the `latest` manifest put under ten names in the "
                     "upstream), and is stopped; the upstream is black-holed as above; after 2.5 s (past every "
                     "freshness window) each cache is started again on its data and asked for the tags one after "
                     f"another, the time to the first byte of each answer capped at {cap:.0f} s, until all are "
                     f"answered or {budget:.0f} s of answers are spent (`--outage-budget`; the rest are left "
                     "unasked). distribution in proxy mode asks its remote's `/v2/` when it starts: it is started "
                     "the same way and its failure to start is recorded instead of times (and, for contrast, how it "
                     "fails with a remote that refuses connections). The regcache under test waits for the "
                     "upstream as its version does (`connect_timeout` today; a `revalidate_budget`, once it has "
                     "one, with its default): the bench sets neither.\n")
        
            def cell(k, i):
                s = S[k]
                if not s["started"]:
                    return "–" if i else "did not start"
                if i >= s["asked"]:
                    return "not asked (budget)"
                txt = fmt_ttfb(s["seconds"][i], cap)
                st = s["statuses"][i]
                if st != 200:
                    txt += f" ({st or 'no answer'})"
                return txt

            ks = [k for k in CACHES if k in S]
            L.append("| tag | " + " | ".join(ks) + " |")
            L.append("|---|" + "---|" * len(ks))
            for i, t in enumerate(rs["tags"]):
                L.append(f"| {i + 1}. `{t.split(':', 1)[1]}` | " + " | ".join(cell(k, i) for k in ks) + " |")
            L.append("| slowest | " + " | ".join(fmt_ttfb(S[k]["max_s"], cap) if S[k]["asked"] else "–"
                                               for k in ks) + " |")
            L.append("| all 10, one after another | " + " | ".join(
                fmt_ttfb(S[k]["sum_s"], cap * 10) if S[k]["sum_s"] is not None else
                (f"≥ {S[k]['sum_asked_s']:.1f} s ({S[k]['asked']} asked)" if S[k]["asked"] else "–")
                for k in ks) + " |")
            L.append("")
            for k in ks:
                if not S[k]["started"]:
                    L.append(f"- {k}: {S[k]['start_error']}")
                else:
                    w = sorted({x for x in S[k]["warnings"] if x})
                    L.append(f"- {k}: started in {fmt_ttfb(S[k]['start_s'], cap)}; answers "
                             f"{', '.join(str(x) for x in sorted({x for x in S[k]['statuses'] if x})) or '–'}"
                             + (f" with `Warning: {w[0]}`" if w else ""))
            L.append("")
    else:
        L.append("_Not run in this invocation (`--only` without `outage`)._\n")

    L.append("## Fleet herd: N servers as peers, N independent servers, N servers on one bucket (issue 18)\n")
    if "fleet" in W:
        fl = W["fleet"]
        L.append(f"For each N, three fleets of N regcache servers on 127.0.0.1 (distinct ports, a data directory "
                 f"each, `freshness = \"10m\"`, everything else default): **peers** (`[peers]` listing all N, one "
                 f"token file), **independent** (nothing shared), **bucket** (`[store.s3]` on one moto bucket, "
                 f"moto's S3 server on loopback). One client per server, released together by a barrier, pulls "
                 f"`{fl['image']}` cold as docker does (the manifest by tag, then the config and the "
                 f"{fl['image_bytes'] / 2**20:.0f} MiB layer by digest at once, each read to its end). Upstream "
                 "blob bytes are the sizes of the upstream's blob `GET`s in its access log, as × of the image's "
                 "blobs (config + layer); the slowest client is the last one's last byte; the slowest first byte "
                 "is the last client's first body byte of the layer, both from the common start. Blob answers "
                 "by source: `regcache_fills_total{source}` summed over the servers (where the bytes of each "
                 "blob `GET` answer came from; an owner's answers to its peers count under the owner's "
                 "source).\n")
        L.append("Then server i's client also pulls one small image of the fixtures "
                 f"({', '.join(fl['small_images'])}, in turn), the bucket setup waits until no server owes the "
                 "bucket a write, the upstream is stopped and its port taken by the black hole, and every server "
                 "of every setup pulls every image that some server of its setup holds, all at once (each request "
                 f"allowed {fl['pull_timeout_s']:.0f} s): **pullable** is the share of those pulls that succeed, "
                 "with every blob's full size. The servers run with regcache's default upstream timeouts: a "
                 "request that goes upstream first waits `header_timeout` (30 s) on the black hole, and peers "
                 "are asked once the upstream failed or its breaker is open.\n")
        L.append("| N | setup | upstream blob bytes (× image) | upstream blob GETs | slowest client (s) | median client (s) "
                 "| slowest first byte (s) | slowest manifest (s) | blob answers by source | all clients ok "
                 "| upstream black-holed: pullable | slowest pullable pull (s) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n, by in sorted(fl["sizes"].items(), key=lambda kv: int(kv[0])):
            for setup in FLEET_SETUPS:
                r = by.get(setup)
                if r is None:
                    continue
                if r.get("unsupported"):
                    L.append(f"| {n} | {setup} | not supported by this regcache: {r['unsupported']} |" + " |" * 9)
                    continue
                o = r.get("outage") or {}
                pct = (f"{o['pullable_pct']:.0f} % ({o['pullable']}/{o['pulls']})"
                       if o.get("pullable_pct") is not None else "–")
                fills = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.get("fills", {}).items())) or "–"
                L.append(f"| {n} | {setup} | {r['upstream_x']:.2f} | {r['upstream_gets']} | {fmt(r['wall_max'], 's')} | "
                         f"{fmt(r['wall_median'], 's')} | {fmt(r['first_byte_max'], 's')} | "
                         f"{fmt(r['manifest_max'], 's')} | {fills} | {'yes' if r['ok'] else 'NO'} | {pct} | "
                         f"{fmt(o.get('slowest_ok_s'), 's')} |")
        L.append("")
        fails = [(n, s, f) for n, by in fl["sizes"].items() for s, r in by.items()
                 for f in (r.get("outage") or {}).get("failed", [])]
        if fails:
            L.append("Pulls that failed with the upstream black-holed (first 12):\n")
            for n, s, f in fails[:12]:
                after = f" after {fmt(f['after_s'], 's')} s" if f.get("after_s") is not None else ""
                L.append(f"- N={n} {s}: server {f['server']}, {f['image']}: {f['error']}{after}")
            L.append("")
    else:
        L.append("_Not run in this invocation (`--only` without `fleet`)._\n")
    if before_after:
        L.append(before_after + "\n")
    L.append("## Notes on the setup\n")
    L.append("""- **Upstream**: Debian's `docker-registry` (filesystem storage, `blobdescriptor: inmemory`), seeded with
  the small images of `tests/fixtures/seed.sh` and `bench/big:latest` (OCI, one gzip layer of 200 MiB of
  incompressible bytes). Bytes fetched from it are read from its access log (each line has the size sent).
- **regcache**: `target/release/regcache serve --config FILE`, one `[upstreams.bench]` with `freshness = "60s"`
  (`"1s"` in the outage run); everything else default (log level info).
- **distribution** in proxy mode: `proxy: remoteurl:` the upstream, filesystem storage, `blobdescriptor: inmemory`,
  access log on (its default).
- **nginx** (config written by the script, see `nginx_conf()` in `bench/bench.py`): `proxy_cache` on disk,
  `proxy_cache_lock on; proxy_cache_lock_age 10m; proxy_cache_lock_timeout 10m;`,
  `proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;`, blobs and manifests by digest valid
  365 d, manifests by tag and everything else 60 s (1 s in the outage run), upstream `Cache-Control`/`Expires`
  ignored, the cache key of manifests is the URI plus **all** `Accept` lines joined by njs (`r.rawHeadersIn`),
  `sendfile on`, upstream keepalive, `keepalive_requests 100000` (so wrk's connections are not recycled every
  1000 requests), access log on. `nginx-static` is the same nginx serving the upstream's blob file directly
  (`alias`, sendfile): the practical limit for warm blob GETs.
- **Workloads**: `cold_pull`/`warm_pull`: `skopeo copy docker://… dir:` (to tmpfs) of `bench/big:latest`, wall
  time; cold = fresh cache directory per run. `blob_gbps`: `wrk -c 8 -t 2` on the layer blob for a fixed time;
  GB/s from wrk's byte count; `cpu_per_gb` = the server's utime+stime delta (`/proc/PID/stat`, all its processes)
  over those runs / GB sent. `tag_rps`, `digest_rps`: `wrk -c 16 -t 2`, `GET` of the manifest with docker's six
  `Accept` lines. `head_rps`: `ab -k -i -c 16` (ApacheBench, apache2-utils; wrk 4.1 waits for a body after a
  `HEAD` response), `HEAD` of the 200 MiB layer blob. `rss64`: `wrk -c 64` on the blob; peak RSS = `VmHWM` summed over the server's
  processes, reset before the run by writing 5 to `/proc/PID/clear_refs`. `herd16`: 16 Python `http.client`
  threads released by a barrier on a fresh cache, time to first body byte and to the last byte per client;
  upstream copies from the upstream's access log; compared with one client alone on a fresh cache.
  `startup`: `regcache serve` spawned until `/readyz` answers 200 (polled every 5 ms), on the store left by the
  other workloads and on a store of 100 000 small blobs filled once through regcache from an in-process fake
  upstream (kept in `bench/.work/store-100000` and reused by later runs; `--rebuild-store` refills it).
""")
    L.append(LEAD_BEGIN)
    L.append(lead.rstrip("\n"))
    L.append(LEAD_END)
    path.write_text("\n".join(L) + "\n")


def run_spread(W: dict) -> list:
    """(workload, unit, {target: (min, max)}) from the individual runs."""
    out = []

    def add(name, unit, runs, key=None):
        by = {}
        for t, rs in runs.items():
            xs = [(r[key] if key else r) for r in rs]
            xs = [x for x in xs if x is not None]
            if xs:
                by[t] = (min(xs), max(xs))
        if by:
            out.append((name, unit, by))

    if "cold_pull" in W:
        add("cold_pull", "s", W["cold_pull"]["runs"])
    if "warm_pull" in W:
        add("warm_pull", "s", W["warm_pull"]["runs"])
    if "blob_gbps" in W:
        add("blob_gbps", "GB/s", W["blob_gbps"]["runs"], "gbps")
        add("cpu_per_gb", "s/GB", W["blob_gbps"]["runs"], "cpu_s_per_gb")
    if "herd16" in W:
        add("herd16 wall", "s", W["herd16"]["runs"], "wall")
        add("herd16 one client", "s", W["herd16"]["one_client_runs"])
    for name in ["tag_rps", "digest_rps", "head_rps"]:
        if name in W:
            add(name, "req/s", W[name]["runs"], "rps")
    if "rss64" in W:
        add("rss64", "MiB", W["rss64"]["runs"], "hwm_mib")
    return out


def print_table(rows: list[dict]) -> None:
    cols = ["regcache", "distribution", "nginx", "upstream", "nginx-static"]
    print()
    print(f"{'workload / measure':58s} " + " ".join(f"{c:>12s}" for c in cols) + "  ratios / target / met")
    for r in rows:
        name = (r["workload"] + " — " if r["workload"] else "   ") + r["measure"]
        vals = " ".join(f"{fmt(r['values'].get(c), r['unit']) if c in r['values'] else '':>12s}" for c in cols)
        rs = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items() if v is not None)
        print(f"{name[:58]:58s} {vals}  [{rs}] {r['target']}: {'MET' if r['met'] else 'MISSED'}")
    print()


# -------------------------------------------------------------------------------------------- main

REGCACHE_BIN = ROOT / "target/release/regcache"
# Which regcache the run measures: this checkout, or a git revision built under bench/.work (--regcache-rev).
BUILD: dict = {"source": "checkout"}


def git(*args: str, cwd: Path = ROOT, check=True) -> str:
    cp = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if check and cp.returncode != 0:
        die(f"`git {' '.join(args)}` failed: {cp.stderr.strip()}")
    return cp.stdout.strip()


def commit_info(commit: str) -> dict:
    """The commit's full and short hash, subject and commit date (ISO)."""
    out = git("show", "-s", "--format=%H%n%h%n%cI%n%s", commit)
    full, short, date, subject = (out.split("\n", 3) + ["", "", ""])[:4]
    return {"commit": full, "short": short, "commit_date": date, "subject": subject}


def build_rev(rev: str) -> Path:
    """Builds regcache at git revision `rev` in a detached worktree under bench/.work/rev-<hash>/src with
    its own target dir (bench/.work/rev-<hash>/target), once: a later run with the same commit reuses it.
    Returns the release binary."""
    commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not commit:
        die(f"--regcache-rev {rev!r}: no such commit in {ROOT}")
    info = commit_info(commit)
    base = WORK / f"rev-{commit[:12]}"
    src, target = base / "src", base / "target"
    binary = target / "release" / "regcache"
    stamp = base / ".built"
    BUILD.update({"source": "worktree", "rev": rev, **info, "worktree": str(src), "binary": str(binary)})
    if stamp.is_file() and binary.is_file() and json.loads(stamp.read_text()).get("commit") == commit:
        log(f"regcache {rev} = {info['short']} ({info['subject'][:60]}): reusing {binary}")
        return binary
    base.mkdir(parents=True, exist_ok=True)
    if (src / ".git").exists() and git("rev-parse", "HEAD", cwd=src, check=False) != commit:
        git("worktree", "remove", "--force", str(src), check=False)
    if not (src / ".git").exists():
        shutil.rmtree(src, ignore_errors=True)
        git("worktree", "prune")
        log(f"regcache {rev} = {info['short']}: git worktree add --detach {src}")
        git("worktree", "add", "--detach", str(src), commit)
    seed = ROOT / "target" / "release"
    if not target.exists() and (seed / "deps").is_dir():
        # Only a head start: cargo rebuilds whatever differs (its fingerprints decide).
        log(f"seeding {target} from {seed} (compiled dependencies)")
        target.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(seed), str(target / "release")], check=False)
    log(f"building regcache {info['short']} (cargo build --release, target {target})")
    env = dict(child_env(), CARGO_TARGET_DIR=str(target))
    cp = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=src, env=env)
    if cp.returncode != 0 or not binary.is_file():
        die(f"cargo build --release of {rev} ({info['short']}) failed in {src}")
    stamp.write_text(json.dumps({"commit": commit, "built": datetime.datetime.now().isoformat(timespec="seconds")}))
    return binary


def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shorter runs (smoke run)")
    ap.add_argument("--only", default="", metavar="WORKLOAD[,...]",
                    help=f"run only these workloads: {', '.join(WORKLOADS)}")
    ap.add_argument("--regcache-rev", metavar="REV",
                    help="measure regcache built from git revision REV (a detached worktree under "
                         "bench/.work/rev-HASH with its own target dir, built once and reused) instead of "
                         "this checkout")
    ap.add_argument("--label", metavar="NAME",
                    help="also store the results as bench/results/NAME.json (for --compare); "
                         "bench/results/latest.json is written either way")
    ap.add_argument("--compare", metavar="A,B",
                    help="run nothing: write the side-by-side table of the stored runs "
                         "bench/results/A.json and B.json into docs/BENCHMARKS.md (its before/after section)")
    ap.add_argument("--fleet-sizes", default=None, metavar="N[,...]",
                    help="fleet: numbers of servers (default 2,4,8; 2,4 with --quick)")
    ap.add_argument("--outage-budget", type=float, default=60.0, metavar="S",
                    help="outage: seconds of requests per cache after the restart before the remaining "
                         "tags are left unasked (default 60; nginx needs about 300 for all 10 tags)")
    ap.add_argument("--ttfb-cap", type=float, default=35.0, metavar="S",
                    help="outage: cap on one request, seconds (default 35)")
    ap.add_argument("--skip-100k", action="store_true", help="startup: skip the 100 000-blob store")
    ap.add_argument("--blobs-100k", type=int, default=100_000, help=argparse.SUPPRESS)
    ap.add_argument("--rebuild-store", action="store_true", help="startup: refill the cached 100 000-blob store")
    ap.add_argument("--fill-limit", type=float, default=600.0, metavar="S",
                    help="startup: time limit for filling that store, seconds (default 600)")
    ap.add_argument("--no-build", action="store_true",
                    help="use the existing target/release/regcache (not with --regcache-rev)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/ (results JSON only)")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite docs/ from bench/results/latest.json")
    return ap


def flags_doc() -> list[str]:
    """One Markdown line per flag of the script, from the parser (so the header names them all)."""
    out = []
    for a in arg_parser()._actions:
        if not a.option_strings or a.help in (None, argparse.SUPPRESS) or "-h" in a.option_strings:
            continue
        name = a.option_strings[-1] + (f" {a.metavar}" if a.metavar else "")
        out.append(f"- `{name}`: {a.help}")
    return out


LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def stored_run(name: str) -> tuple[str, dict]:
    """A stored run by label (bench/results/NAME.json) or by path."""
    path = Path(name) if ("/" in name or name.endswith(".json")) else RESULTS / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in RESULTS.glob("*.json"))
        die(f"--compare: {path} does not exist (stored runs: {', '.join(have) or 'none'})")
    label = path.stem if path.parent.resolve() == RESULTS.resolve() else str(path)
    return label, json.loads(path.read_text())


def main() -> int:
    global REGCACHE_BIN
    ap = arg_parser()
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.label is not None and (not LABEL_RE.match(args.label) or args.label == "latest"):
        ap.error(f"--label {args.label!r}: letters, digits, '.', '_' and '-' (not 'latest'), at most 64")
    if args.regcache_rev and args.no_build:
        ap.error("--no-build uses this checkout's target/release/regcache: not with --regcache-rev")
    if args.fleet_sizes is not None:
        try:
            sizes = [int(x) for x in args.fleet_sizes.split(",") if x]
        except ValueError:
            sizes = []
        if not sizes or any(n < 2 or n > 32 for n in sizes):
            ap.error(f"--fleet-sizes {args.fleet_sizes!r}: numbers of servers from 2 to 32, comma-separated")
    selected = only or WORKLOADS
    if args.compare is not None:
        names = [x for x in args.compare.split(",") if x]
        if len(names) != 2:
            ap.error("--compare takes two stored runs: A,B (e.g. before,after)")
        (la, a), (lb, b) = stored_run(names[0]), stored_run(names[1])
        section = compare.render(la, a, lb, b)
        compare.insert(DOCS / "BENCHMARKS.md", section)
        log(f"wrote the comparison of {la} and {lb} into docs/BENCHMARKS.md")
        return 0
    if args.render_only:
        res = json.loads((RESULTS / "latest.json").read_text())
        rows = evaluate(res)
        print_table(rows)
        svg_chart(rows, DOCS / "bench-ratios.svg")
        write_markdown(res, rows, DOCS / "BENCHMARKS.md")
        log("rewrote docs/bench-ratios.svg and docs/BENCHMARKS.md from bench/results/latest.json")
        return 0
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    ensure_deps(selected)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.regcache_rev:
        REGCACHE_BIN = build_rev(args.regcache_rev)
    else:
        if not args.no_build:
            log("building regcache (cargo build --release)")
            cp = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, env=child_env())
            if cp.returncode != 0:
                die("cargo build --release failed")
        dirty = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock", check=False)
        BUILD.update({**commit_info("HEAD"), "modified": bool(dirty), "binary": str(REGCACHE_BIN)})
    if not REGCACHE_BIN.exists():
        die(f"{REGCACHE_BIN} missing")

    b = Bench(args, selected)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        b.setup()
        for w in WORKLOADS:
            if w in selected:
                log(f"=== {w}")
                getattr(b, f"w_{w}")()
    finally:
        b.teardown()
        Server.stop_all()
    total = time.monotonic() - T0
    res = b.results
    res.update({
        "command": "python3 bench/bench.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "date": date, "total_seconds": total, "quick": args.quick, "only": only, "machine": machine_info(),
        "loadavg_before": " ".join(load_before), "loadavg_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "label": args.label, "regcache_build": dict(BUILD),
    })
    rows = evaluate(res)
    res["targets"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1, default=str) + "\n"
    (RESULTS / "latest.json").write_text(text)
    written = ["bench/results/latest.json"]
    if args.label:
        (RESULTS / f"{args.label}.json").write_text(text)
        written.append(f"bench/results/{args.label}.json")
    print_table(rows)
    if not args.no_docs:
        svg_chart(rows, DOCS / "bench-ratios.svg")
        write_markdown(res, rows, DOCS / "BENCHMARKS.md")
        written += ["docs/bench-ratios.svg", "docs/BENCHMARKS.md"]
    log(f"wrote {', '.join(written)}")
    log(f"total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
