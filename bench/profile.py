"""Where the proxy's CPU goes under load: py-spy samples the pinned proxy while wrk drives the instant mock.

Writes a flame graph (SVG) and the collapsed stacks next to the results, and returns the top frames by
self time and by inclusive time (share of samples), which is what the README's findings quote.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson

from bench.loadgen import chat_body, run_wrk
from bench.targets import ENVS, Target, ensure_tools


def ensure_pyspy() -> str:
    """py-spy beside the running interpreter, on PATH, or from bench/envs/tools (installed on first use)."""
    for cand in (Path(sys.executable).with_name("py-spy"), ENVS / "tools" / "bin" / "py-spy"):
        if cand.exists():
            return str(cand)
    found = shutil.which("py-spy")
    if found:
        return found
    ensure_tools()
    return str(ENVS / "tools" / "bin" / "py-spy")


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "handle (services/proxy/handler.py:120)"; keep function and file
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarize(collapsed: str, top: int = 25) -> dict:
    """Top frames by self samples and by inclusive samples, plus a coarse split by package."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        pkg[package_of(frames[-1])] += n
    pct = (lambda c: [{"frame": f, "share": round(n / total, 4)} for f, n in c.most_common(top)]) if total else None
    return {"samples": total, "self": pct(self_c) if pct else [], "inclusive": pct(incl) if pct else [],
            "by_package_self": {k: round(v / total, 4) for k, v in pkg.most_common()} if total else {}}  # fmt: skip


def package_of(frame: str) -> str:
    where = frame.rsplit("(", 1)[-1].rstrip(")")
    if where.startswith(("services/", "schemas/", "tollway/")):
        return where.split("/", 1)[0] + "/" + where.split("/")[1].removesuffix(".py")
    head = where.split("/", 1)[0]
    return head.removesuffix(".py") or "?"


def run(t: Target, out_dir: Path, seconds: float = 15.0, connections: int = 64, mock: str = "instant") -> dict:
    assert t.proc is not None
    spy = ensure_pyspy()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path, svg_path = out_dir / f"{t.name}.collapsed.txt", out_dir / f"{t.name}.svg"
    body = orjson.dumps(chat_body(t.models[mock]))
    load = threading.Thread(target=run_wrk, args=(t.urls[mock], body, t.headers_for(mock), connections,
                                                  seconds + 4))  # fmt: skip
    load.start()
    # the python process is the child of taskset's exec: same pid
    base = [spy, "record", "--pid", str(t.proc.pid), "--duration", str(int(seconds)), "--rate", "250", "--nonblocking"]
    subprocess.run([*base, "--format", "raw", "-o", str(raw_path)], capture_output=True, timeout=seconds + 60)
    load.join()
    load2 = threading.Thread(target=run_wrk, args=(t.urls[mock], body, t.headers_for(mock), connections, 9))
    load2.start()
    subprocess.run([*base[:5], "5", *base[6:], "--format", "flamegraph", "-o", str(svg_path)], capture_output=True,
                   timeout=90)  # fmt: skip
    load2.join()
    text = raw_path.read_text() if raw_path.exists() else ""
    out = summarize(text)
    out["files"] = [str(p) for p in (raw_path, svg_path) if p.exists()]
    return out
