"""CPU per call of the proxy's own request path, in process: the ASGI app called directly (no sockets, no
server, no load generator) with the upstream call replaced by a canned answer. What is left is Tollway's
work per call: auth, parse, rate limits, quota reservation, routing, forward bookkeeping, the usage event
(spool write included), metrics and the response. Steadier than a wrk run on a shared box; use it to
compare changes to the handler.

    .venv/bin/python -m bench.request_path [--calls 5000] [--profile] [--tagged]

--tagged: each call carries attribution (a `user`, a 3-entry body `metadata` and an X-Tollway-Tags header).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import orjson

from bench.loadgen import chat_body
from bench.targets import tollway_config
from schemas.config import GatewayConfig
from schemas.control import KeyState, TeamState
from schemas.keys import display_prefix, hash_key, new_secret
from services.proxy import handler
from services.proxy.app import create_app
from services.proxy.settings import ProxySettings
from services.proxy.upstream import UpstreamReply

REPLY = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 300},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 200, "completion_tokens": 64, "total_tokens": 264}})  # fmt: skip


async def canned(pool, target, path, body, budget_s=None) -> UpstreamReply:
    return UpstreamReply(200, REPLY, orjson.loads(REPLY), None)


async def measure(calls: int, profile: bool = False, tagged: bool = False) -> float:
    real = handler.post_json
    handler.post_json = canned  # the upstream hop is measured elsewhere (the floor rows of bench.run)
    try:
        return await _measure(calls, profile, tagged)
    finally:
        handler.post_json = real


async def _measure(calls: int, profile: bool, tagged: bool) -> float:
    config = GatewayConfig.model_validate(
        tollway_config({"instant": "http://127.0.0.1:9", "50ms": "http://127.0.0.1:9"})
    )
    with tempfile.TemporaryDirectory() as tmp:
        # no broker: the emitter keeps retrying in the background and every event lands in the spool
        app = create_app(ProxySettings(data_dir=Path(tmp), proxy_instance="bench"), config, "127.0.0.1:1")
        async with app.router.lifespan_context(app):
            secret = new_secret()
            app.state.proxy.control.apply(TeamState(team_id="t1", name="t1", plan="bench"))
            app.state.proxy.control.apply(KeyState(key_id="k1", key_hash=hash_key(secret), prefix=display_prefix(secret),
                                          team_id="t1"))  # fmt: skip
            extra = {"user": "end-user-1", "metadata": {"project": "apollo", "env": "prod", "ticket": "T-1"}}
            body = orjson.dumps({**chat_body("bench-instant"), **(extra if tagged else {})})
            headers = [(b"host", b"proxy"), (b"content-type", b"application/json"),
                       (b"authorization", f"Bearer {secret}".encode()), (b"content-length", b"%d" % len(body))]  # fmt: skip
            if tagged:
                headers.append((b"x-tollway-tags", b"team=search,feature=rerank"))
            statuses: list[int] = []

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            async def one() -> None:
                scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                         "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                         "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                         "server": ("127.0.0.1", 8080)}  # fmt: skip
                pending = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive() -> dict:
                    return pending.pop() if pending else {"type": "http.disconnect"}

                await app(scope, receive, send)

            for _ in range(1000):  # warm-up
                await one()
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                for _ in range(calls):
                    await one()
                best = min(best, (time.process_time() - t0) / calls)
            if set(statuses) != {200}:
                raise SystemExit(f"the request path did not answer 200: {sorted(set(statuses))}")
            if profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(calls):
                    await one()
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of one more round")
    ap.add_argument("--tagged", action="store_true", help="calls carry a user, body metadata and a tags header")
    args = ap.parse_args()
    us = asyncio.run(measure(args.calls, args.profile, args.tagged)) * 1e6
    print(orjson.dumps({"request_path_cpu_us_per_call": round(us, 1), "calls": args.calls}).decode())


if __name__ == "__main__":
    main()
