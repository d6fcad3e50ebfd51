"""`python -m bench.run`: run the benchmark parts, print one table, write JSON under bench/results/.

Parts (each runnable alone with --only): proxy (direct + Tollway, plus its cache-hit path), litellm, portkey,
variants (Tollway with one landed hot-path change taken back out, to see what it buys), emit (usage-event CPU
cost), meter (bench/meter_throughput.py), quota (bench/quota_lag.py), profile (py-spy; not in the default set).
Direct-to-mock is measured in every run that drives a gateway. Bounded: 7-8 minutes at the defaults, plus
the peers' one-time installs on a fresh machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import emit_cost, proxy_bench, side_by_side, table, targets
from bench import profile as spy
from bench.loadgen import ensure_wrk
from bench.procs import can_pin

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PARTS = ("proxy", "litellm", "portkey", "variants", "emit", "meter", "quota")
ALL_PARTS = (*DEFAULT_PARTS, "profile")
# what each landed change buys, measured by taking it back out at start (bench/variant_proxy.py); name -> variant
VARIANTS = {
    "tollway+asyncio+h11": "asyncio",
    "tollway+fastapi-routes": "fastapi",
    "tollway+aiohttp-plain": "aiohttp",
}
EXTERNAL = {"meter": "bench.meter_throughput", "quota": "bench.quota_lag"}  # owned by issues 4 and 5
EXTERNAL_ARGS = {"meter": ["--procs", "2"]}  # issue 4's targets: one meter, and two processes in one group
EXTERNAL_TIMEOUT_S = 300  # meter (800k events, two runs) ~130 s, quota ~35 s here


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=targets.REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=targets.REPO)  # fmt: skip
    wrk = shutil.which("wrk")
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
        "kernel": platform.release(), "pinned": can_pin(),
        "git": (git.stdout.strip() or "?") + ("+dirty" if dirty.stdout.strip() else ""),
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0] if wrk else None,
    }  # fmt: skip


def peer_versions() -> dict[str, str]:
    out = {}
    pip = targets.ENVS / "litellm" / "bin" / "pip"
    if pip.exists():
        shown = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True).stdout
        out["litellm"] = next((ln.split(":", 1)[1].strip() for ln in shown.splitlines() if ln.startswith("Version")),
                              "?")  # fmt: skip
    pkg = targets.ENVS / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
    if pkg.exists():
        out["portkey"] = json.loads(pkg.read_text()).get("version", "?")
    return out


def run_external(part: str) -> dict[str, Any]:
    """A colleague's bench script, as its own process; its last JSON object on stdout is its result."""
    module = EXTERNAL[part]
    if importlib.util.find_spec(module) is None:
        return {"skipped": f"{module.replace('.', '/')}.py does not exist yet"}
    log(f"[{part}] python -m {module} ...")
    out = subprocess.run([sys.executable, "-m", module, *EXTERNAL_ARGS.get(part, [])], capture_output=True, text=True, cwd=targets.REPO,
                         timeout=EXTERNAL_TIMEOUT_S)  # fmt: skip
    parsed = last_json(out.stdout) or (parse_quota_text(out.stdout) if part == "quota" else None)
    if out.returncode != 0 or parsed is None:
        raise RuntimeError(f"{module} exited {out.returncode}: {(out.stderr or out.stdout)[-600:]}")
    return parsed


def last_json(text: str) -> dict | None:
    with contextlib.suppress(ValueError):
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                got = json.loads(line)
                if isinstance(got, dict):
                    return got
    # a pretty-printed object at the end
    start = text.rfind("\n{")
    if start >= 0:
        with contextlib.suppress(ValueError):
            got = json.loads(text[start:])
            if isinstance(got, dict):
                return got
    return None


def parse_quota_text(text: str) -> dict | None:
    """bench/quota_lag.py prints sentences, not JSON (yet): pick its numbers out of them."""
    out: dict[str, Any] = {}
    # The first lines are a key limit's; lines led by "end-user budget:" are an end user's budget (issue 16).
    for lead, name in (("", ""), ("end-user budget: ", "end_user_")):
        for scope in ("cross", "same"):
            m = re.search(lead + scope + r"-proxy[^\n]*?p50 ([\d.]+) ms\s+p99 ([\d.]+) ms", text)
            if m:
                out[f"{name}{scope}_p50_ms"], out[f"{name}{scope}_p99_ms"] = float(m[1]), float(m[2])
    m = re.search(r"overshoot[^\n]*?max (-?\d+) tokens, mean (-?[\d.]+)", text)
    if m:
        out["overshoot_max_tokens"], out["overshoot_mean_tokens"] = int(m[1]), float(m[2])
    return out or None


def write_results(res: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = res["meta"]["started"].replace(":", "").replace("-", "")
    path = out_dir / f"{stamp}.json"
    data = json.dumps(res, indent=2, default=str)
    for p in (path, out_dir / "latest.json"):
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(data)
        tmp.replace(p)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(DEFAULT_PARTS), help=f"comma list of parts: {', '.join(ALL_PARTS)}")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load before each run")
    ap.add_argument("--stream-calls", type=int, default=300, help="streamed calls per target (c=1)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 s warm-up, 100 streamed calls (smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.stream_calls = 2.0, 1.0, 100
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")

    t_start = time.monotonic()
    res: dict[str, Any] = {"meta": {"started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                    "parts": parts, "duration_s": args.duration, "warmup_s": args.warmup,
                                    "load_before": proxy_bench.load_avg(), **machine()},
                           "proxy": {}, "errors": {}}  # fmt: skip
    run_dir = targets.ENVS / "runs" / res["meta"]["started"].replace(":", "")
    run_dir.mkdir(parents=True, exist_ok=True)
    res["meta"]["logs"] = str(run_dir)
    log(f"bench: parts {parts}; logs in {run_dir}")

    gateways = [p for p in ("proxy", "litellm", "portkey", "profile") if p in parts]
    if "variants" in parts:
        gateways += [*VARIANTS, "floor"]
    mocks: list = []
    try:
        if gateways:
            ensure_wrk()
            mock_urls, mocks = targets.start_mocks(run_dir)
            log("[direct] mocks up")
            direct = targets.direct(mock_urls)
            res["proxy"]["direct"] = proxy_bench.run_target(direct, args.duration, args.warmup, args.stream_calls,
                                                            log)  # fmt: skip
            res["proxy"]["direct"]["responses"] = proxy_bench.run_responses(
                direct, args.duration, args.warmup, args.stream_calls, log)  # fmt: skip
            res["proxy"]["direct"]["messages"] = proxy_bench.run_messages(direct, args.duration, args.warmup,
                                                                          args.stream_calls, log)  # fmt: skip
            starters = {"proxy": targets.start_tollway, "litellm": targets.start_litellm,
                        "portkey": targets.start_portkey, "floor": targets.start_floor}  # fmt: skip
            for part in gateways:
                name = "tollway" if part in ("proxy", "profile") else part
                log(f"[{part}] starting {name} ...")
                try:
                    if part in VARIANTS:
                        t = targets.start_tollway(run_dir, mock_urls, variant=VARIANTS[part], name=part)
                    else:
                        t = starters.get(part, targets.start_tollway)(run_dir, mock_urls)
                except Exception as err:
                    res["errors"][part] = f"{name} did not start: {err}"[:800]
                    log(f"[{part}] {res['errors'][part]}")
                    continue
                try:
                    if part.startswith("profile"):
                        res.setdefault("profile", {})[t.name] = spy.run(t, args.out / "profile")
                        continue
                    res["proxy"][name] = proxy_bench.run_target(t, args.duration, args.warmup, args.stream_calls,
                                                                log)  # fmt: skip
                    if name == "tollway":
                        res["proxy"][name]["cache"] = proxy_bench.run_cache(t, args.duration, args.warmup, log)
                        res["proxy"][name]["responses"] = proxy_bench.run_responses(
                            t, args.duration, args.warmup, args.stream_calls, log)  # fmt: skip
                    if t.messages:
                        res["proxy"][name]["messages"] = proxy_bench.run_messages(t, args.duration, args.warmup,
                                                                                  args.stream_calls, log)  # fmt: skip
                    if name == "tollway":
                        calls = max(10, args.stream_calls // 5)
                        log(f"  tollway: chat, /v1/messages, /v1/responses side by side, 8 rounds x {calls} calls ...")
                        res["proxy"]["side_by_side"] = side_by_side.run({"direct": direct, "tollway": t}, 8, calls)
                except Exception as err:
                    res["errors"][part] = f"{type(err).__name__}: {err}"[:800]
                    log(f"[{part}] failed: {res['errors'][part]}")
                finally:
                    t.stop()
        for m in mocks:
            m.stop()
        mocks = []
        if "emit" in parts:
            log("[emit] usage event CPU cost ...")
            try:
                res["emit"] = emit_cost.run(run_dir, log)
            except Exception as err:
                res["errors"]["emit"] = f"{type(err).__name__}: {err}"[:800]
        for part in ("meter", "quota"):
            if part in parts:
                try:
                    res[part] = run_external(part)
                except Exception as err:
                    res["errors"][part] = f"{type(err).__name__}: {err}"[:800]
    finally:
        for m in mocks:
            m.stop()
    res["meta"]["peers"] = peer_versions()
    res["meta"]["load_after"] = proxy_bench.load_avg()
    res["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
    path = write_results(res, args.out)
    print(table.render(res))
    print(f"results: {path} (and latest.json); elapsed {res['meta']['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
