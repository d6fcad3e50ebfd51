"""Each API's request path WITH its upstream hop, in process: the proxy's ASGI app called directly (as
bench.request_path does, no server socket, no load generator) but forwarding for real to the project's mock
upstream in its own process. Rounds of `calls` calls per API, the API order reversed every round, so drift
falls on every API alike.

Per API, medians over the rounds of:
  cpu_us   the proxy process's CPU per call (process_time): Tollway's work, the HTTP client's included
  wall_us  wall time per call
  wait_us  wall - cpu: the time spent waiting on the mock (its handler, the loopback hop)

What it separates: bench.side_by_side's "added latency" per API is (through the gateway) - (direct), and
assumes the mock takes the same time in both; `cpu_us` is the part of a difference between APIs that is the
gateway's own work, `wait_us` the part that is the mock's.

    .venv/bin/python -m bench.upstream_hop [--calls 1000] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import orjson

from bench import targets
from bench.request_path import APIS, caller, serving
from schemas.config import GatewayConfig


async def measure(calls: int, rounds: int, warmup: int = 300) -> dict:
    mock_urls, mocks = targets.start_mocks(targets.new_run_dir("hop"))
    try:
        async with serving(GatewayConfig.model_validate(targets.tollway_config(mock_urls))) as (app, secret):
            calls_of = {api: caller(app, secret, api) for api in APIS}
            for one, _ in calls_of.values():
                for _ in range(warmup):
                    await one()
            cpu: dict[str, list[float]] = {api: [] for api in APIS}
            wall: dict[str, list[float]] = {api: [] for api in APIS}
            order = list(APIS)
            for r in range(rounds):
                for api in order if r % 2 == 0 else order[::-1]:
                    one = calls_of[api][0]
                    c0, w0 = time.process_time(), time.perf_counter()
                    for _ in range(calls):
                        await one()
                    cpu[api].append((time.process_time() - c0) / calls * 1e6)
                    wall[api].append((time.perf_counter() - w0) / calls * 1e6)
            for api, (_, statuses) in calls_of.items():
                if set(statuses) != {200}:
                    raise SystemExit(f"{api} did not answer 200: {sorted(set(statuses))}")
    finally:
        for m in reversed(mocks):
            m.stop()
    out: dict = {"calls": calls, "rounds": rounds, "load_average": [round(x, 2) for x in os.getloadavg()]}
    for api in APIS:
        c, w = statistics.median(cpu[api]), statistics.median(wall[api])
        out[api] = {"cpu_us": round(c, 1), "wall_us": round(w, 1), "wait_us": round(w - c, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream_hop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per (round, api)")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    print(orjson.dumps(asyncio.run(measure(args.calls, args.rounds))).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
