"""The before/after table of two stored benchmark runs (`bench/bench.py --compare A,B`, issue 17).

Reads two results files written by `bench/bench.py --label NAME` (bench/results/NAME.json) and renders
their key figures side by side as a Markdown section that lives between the markers below in
docs/BENCHMARKS.md: `--compare` replaces that section only, and a full run that rewrites the file keeps it.
Standard library only; no measuring here.
"""

from __future__ import annotations

import math
from pathlib import Path

BEGIN = "<!-- BEGIN before/after: written by bench/bench.py --compare A,B; kept when the file is rewritten -->"
END = "<!-- END before/after -->"


def _runs(w: dict, key: str | None, cache="regcache") -> list[float]:
    xs = [(r.get(key) if key else r) for r in (w.get("runs") or {}).get(cache, [])]
    return [x for x in xs if isinstance(x, (int, float)) and x is not None]


def _spread(xs: list[float]):
    return (min(xs), max(xs)) if len(xs) > 1 else None


def figures(res: dict) -> dict[str, dict]:
    """id -> {label, unit, better, value, spread (min, max) or None, nginx (the same figure of nginx in
    that run, to show how the machine itself moved between the runs)}."""
    W = res.get("workloads", {})
    out: dict[str, dict] = {}

    def put(fid, label, unit, better, value, spread=None, nginx=None):
        if value is not None:
            out[fid] = {"label": label, "unit": unit, "better": better, "value": value, "spread": spread,
                        "nginx": nginx}

    for name, label in [("tag_rps", "manifest by tag (wrk, 16 conns)"),
                        ("digest_rps", "manifest by digest (wrk, 16 conns)"),
                        ("head_rps", "HEAD of a blob (ab -k, 16 conns)")]:
        if name in W:
            w = W[name]
            put(name, label, "req/s", "higher", w["median"].get("regcache"), _spread(_runs(w, "rps")),
                w["median"].get("nginx"))
    if "blob_gbps" in W:
        w = W["blob_gbps"]
        put("blob_gbps", "warm blob GET, 8 clients", "GB/s", "higher", w["median"].get("regcache"),
            _spread(_runs(w, "gbps")), w["median"].get("nginx"))
        put("cpu_per_gb", "CPU per GB served warm", "s/GB", "lower",
            (W.get("cpu_per_gb") or {}).get("median", {}).get("regcache"), _spread(_runs(w, "cpu_s_per_gb")),
            (W.get("cpu_per_gb") or {}).get("median", {}).get("nginx"))
    if "herd16" in W:
        h = W["herd16"]
        s = h["summary"].get("regcache", {})
        n = h["summary"].get("nginx", {})
        put("herd_copies", "herd of 16: upstream copies", "×", "lower", s.get("upstream_copies"),
            _spread(_runs(h, "upstream_copies")), n.get("upstream_copies"))
        put("herd_ttfb", "herd of 16: slowest first byte", "s", "lower", s.get("ttfb_max"),
            _spread(_runs(h, "ttfb_max")), n.get("ttfb_max"))
        put("herd_wall", "herd of 16: wall", "s", "lower", s.get("wall"), _spread(_runs(h, "wall")),
            n.get("wall"))
        one = [x for x in (h.get("one_client_runs") or {}).get("regcache", []) if x is not None]
        put("herd_one", "one cold client alone", "s", "lower", s.get("one_client_wall"), _spread(one),
            n.get("one_client_wall"))
    if "rss64" in W:
        w = W["rss64"]
        put("rss64", "peak RSS, 64 warm streams", "MiB", "lower", w["median"].get("regcache"),
            _spread(_runs(w, "hwm_mib")), w["median"].get("nginx"))
    for name, label in [("cold_pull", "cold pull, 200 MiB image"), ("warm_pull", "warm pull, same image")]:
        if name in W:
            w = W[name]
            put(name, label, "s", "lower", w["median"].get("regcache"), _spread(_runs(w, None)),
                w["median"].get("nginx"))
    if "startup" in W:
        big = W["startup"].get("store_100k") or {}
        put("startup", "start to ready, 100 000 blobs", "s", "lower", big.get("median"),
            _spread([x for x in big.get("runs", []) if x is not None]))
    if "outage" in W:
        o = W["outage"]
        s = o["summary"].get("regcache", {})
        put("outage_first", "outage: first request for a stale tag", "s", "lower", s.get("first_s"),
            None, o["summary"].get("nginx", {}).get("first_s"))
        r = (o.get("restart") or {}).get("summary", {})
        put("outage_restart_max", "outage, after a restart: slowest of the first 10 tags", "s", "lower",
            (r.get("regcache") or {}).get("max_s"), None, (r.get("nginx") or {}).get("max_s"))
        put("outage_restart_sum", "outage, after a restart: the first 10 tags one after another", "s", "lower",
            (r.get("regcache") or {}).get("sum_s"), None, (r.get("nginx") or {}).get("sum_s"))
    if "fleet" in W:
        for n, by in sorted((W["fleet"].get("sizes") or {}).items(), key=lambda kv: int(kv[0])):
            p = by.get("peers") or {}
            put(f"fleet{n}_copies", f"fleet of {n} peers: upstream blob bytes", "×", "lower", p.get("upstream_x"))
            put(f"fleet{n}_wall", f"fleet of {n} peers: slowest client", "s", "lower", p.get("wall_max"))
    return out


def fmt(v, unit="") -> str:
    """A figure for the tables (bench.py's too)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "MiB":
        return f"{v:.0f}"
    if unit == "s" and abs(v) < 0.1:
        return f"{v:.3f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt(v, unit: str) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "–"
    if v is not None and unit == "s" and abs(v) < 0.1:
        return f"{v * 1000:.1f} ms"
    return fmt(v, unit)


def _cell(f: dict | None) -> str:
    if not f:
        return "–"
    text = _fmt(f["value"], f["unit"])
    if f.get("spread"):
        lo, hi = f["spread"]
        text += f" ({_fmt(lo, f['unit'])} – {_fmt(hi, f['unit'])})"
    return text


def _verdict(fa: dict, fb: dict) -> str:
    """better / worse when the runs' ranges do not overlap, else 'within the spread'."""
    a, b = fa["value"], fb["value"]
    if not a or b is None:
        return ""
    if fa.get("spread") and fb.get("spread"):
        (alo, ahi), (blo, bhi) = fa["spread"], fb["spread"]
        if blo <= ahi and alo <= bhi:
            return "within the spread"
    elif abs(b / a - 1) < 0.03:
        return "same (±3 %)"
    higher_better = fa["better"] == "higher"
    word = "better" if (b > a) == higher_better else "worse"
    return word if fa.get("spread") and fb.get("spread") else f"{word} (no spread to judge by)"


def _run_rows(la: str, a: dict, lb: str, b: dict) -> list[str]:
    def build(res):
        bd = res.get("regcache_build") or {}
        if bd.get("short"):
            return f"`{bd['short']}` {bd.get('subject', '')}"
        return res.get("machine", {}).get("git", "?")

    def when(res):
        bd = res.get("regcache_build") or {}
        return (bd.get("commit_date") or "?")[:10]

    def quick(res):
        q = "**--quick (smoke run, not a measurement)**" if res.get("quick") else "full"
        return q + (f", only {', '.join(res['only'])}" if res.get("only") else "")

    rows = [
        ("regcache commit", build),
        ("commit date", when),
        ("built from", lambda r: (f"worktree of `{r['regcache_build'].get('rev')}`"
                                  if (r.get("regcache_build") or {}).get("source") == "worktree" else "the checkout")),
        ("run date", lambda r: r.get("date", "?")),
        ("run", quick),
        ("command", lambda r: f"`{r.get('command', '?')}`"),
        ("load average at start / end", lambda r: f"{r.get('loadavg_before', '?')} / {r.get('loadavg_after', '?')}"),
        ("machine", lambda r: f"{r.get('machine', {}).get('nproc', '?')} cores, {r.get('machine', {}).get('cpu', '?')}, "
                              f"kernel {r.get('machine', {}).get('kernel', '?')}"),
    ]
    out = [f"| | {la} | {lb} |", "|---|---|---|"]
    for label, fn in rows:
        out.append(f"| {label} | {fn(a)} | {fn(b)} |")
    return out


def render(la: str, a: dict, lb: str, b: dict) -> str:
    fa, fb = figures(a), figures(b)
    L = [BEGIN, f"## Before and after: {la} → {lb}\n",
         f"Two stored runs side by side (`python3 bench/bench.py --compare {la},{lb}`, from "
         f"bench/results/{la}.json and bench/results/{lb}.json; nothing is measured by `--compare`). regcache's "
         "medians, with the min – max of the runs behind each where the run has several (the run-to-run "
         "spread: read differences inside it as noise). `nginx` is the same figure of nginx in each run, "
         "measured alongside: when it moved as much as regcache did, the machine moved, not regcache.\n"]
    L += _run_rows(la, a, lb, b)
    L.append("")
    L.append(f"| measure | {la} | {lb} | {lb} / {la} | | nginx {la} → {lb} |")
    L.append("|---|---|---|---|---|---|")
    order = list(fa) + [k for k in fb if k not in fa]
    for fid in order:
        x, y = fa.get(fid), fb.get(fid)
        f = x or y
        ratio = f"{y['value'] / x['value']:.2f}" if x and y and x["value"] else "–"
        verdict = _verdict(x, y) if x and y else ("only in " + (la if x else lb))
        arrow = "↑" if f["better"] == "higher" else "↓"
        ng = (f"{_fmt(x.get('nginx') if x else None, f['unit'])} → {_fmt(y.get('nginx') if y else None, f['unit'])}"
              if (x and x.get("nginx") is not None) or (y and y.get("nginx") is not None) else "")
        L.append(f"| {f['label']} ({f['unit']} {arrow}) | {_cell(x)} | {_cell(y)} | {ratio} | {verdict} | {ng} |")
    L.append("")
    L.append(END)
    return "\n".join(L)


def extract(text: str) -> str | None:
    """The before/after section of an existing docs/BENCHMARKS.md, markers included."""
    if BEGIN in text and END in text:
        return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return None


def insert(path: Path, section: str, before: str = "## Notes on the setup") -> None:
    """Replaces the before/after section of `path`, or inserts it before `before` (else at the end)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    old = extract(text)
    if old is not None:
        text = text.replace(old, section)
    elif before in text:
        text = text.replace(before, section + "\n\n" + before, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
