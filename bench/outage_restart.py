#!/usr/bin/env python3
"""Time to answer for the first request for each of 10 cached tags after a regcache restart, with
the upstream black-holed (a port that accepts connections and never answers): the figure of
docs/OPERATIONS.md, "An upstream outage and a restart".

    python3 bench/outage_restart.py target/debug/regcache [REVALIDATE_BUDGET]

A small upstream (this script, 10 tags) is cached through regcache (freshness 1 s); regcache is
stopped, the upstream replaced by a black hole on the same port, regcache started again once the
tags are past their freshness, and each tag asked for once, in turn. Needs only the binary."""
import hashlib, http.server, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

BIN = sys.argv[1]
BUDGET = sys.argv[2] if len(sys.argv) > 2 else None
N = 10
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

MANIFESTS = {}
for i in range(N):
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(b"c%d" % i).hexdigest(), "size": 2},
        "layers": []}).encode()
    MANIFESTS[f"/v2/bench/t{i}/manifests/latest"] = body

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def answer(self, body_ok):
        b = MANIFESTS.get(self.path)
        if self.path in ("/v2/", "/v2"):
            self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
            if body_ok: self.wfile.write(b"{}")
            return
        if b is None:
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
        self.send_response(200)
        self.send_header("content-type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("docker-content-digest", "sha256:" + hashlib.sha256(b).hexdigest())
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        if body_ok: self.wfile.write(b)
    def do_GET(self): self.answer(True)
    def do_HEAD(self): self.answer(False)

class BlackHole:
    def __init__(self, port):
        self.sock = socket.socket(); self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port)); self.sock.listen(512); self.sock.settimeout(0.2)
        self.conns = []; self.stop_ = False
        threading.Thread(target=self.loop, daemon=True).start()
    def loop(self):
        while not self.stop_:
            try: c, _ = self.sock.accept(); self.conns.append(c)
            except socket.timeout: continue
            except OSError: return

def get(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": ACCEPT})
    t = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read(); return time.monotonic() - t, r.status, r.headers.get("warning"), r.headers.get("x-regcache-cache")
    except urllib.error.HTTPError as e:
        return time.monotonic() - t, e.code, None, None

up_port, rc_port = free_port(), free_port()
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", up_port), H)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
work = tempfile.mkdtemp(prefix="regcache-outage-")
cfg = os.path.join(work, "c.toml")
with open(cfg, "w") as f:
    f.write(f'data_dir = "{work}/data"\n[upstreams.docker]\nurl = "http://127.0.0.1:{up_port}"\nfreshness = "1s"\n')
    if BUDGET: f.write(f'revalidate_budget = "{BUDGET}"\n')
env = dict(os.environ, REGCACHE_LOG="warn")
def start():
    p = subprocess.Popen([BIN, "serve", "--config", cfg, "--listen", f"127.0.0.1:{rc_port}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "log"), "a"))
    for _ in range(500):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{rc_port}/healthz", timeout=1).read(); return p
        except Exception: time.sleep(0.02)
    sys.exit("regcache did not start")
p = start()
for path in MANIFESTS:
    s, st, w, o = get(rc_port, path); assert st == 200, (path, st)
p.send_signal(signal.SIGTERM); p.wait()
httpd.shutdown(); httpd.server_close()
hole = BlackHole(up_port)
time.sleep(1.2)  # past freshness
p = start()
times = []
for path in MANIFESTS:
    s, st, w, o = get(rc_port, path)
    times.append(s)
    print(f"{path}: {s*1000:7.1f} ms status {st} outcome {o} warning {w!r}")
p.send_signal(signal.SIGTERM); p.wait()
shutil.rmtree(work, ignore_errors=True)
times.sort()
print(f"budget {BUDGET or 'default'}: min {times[0]*1000:.1f} ms, median {times[len(times)//2]*1000:.1f} ms, max {times[-1]*1000:.1f} ms")
