"""CPU per call of the proxy's own request path, in process: the ASGI app called directly (no sockets, no
server, no load generator) with the upstream call replaced by a canned answer. What is left is Tollway's
work per call: auth, parse, rate limits, quota reservation, routing, forward bookkeeping, the usage event
(spool write included), metrics and the response. Steadier than a wrk run on a shared box; use it to
compare changes to the handler.

    .venv/bin/python -m bench.request_path [--calls 5000] [--profile] [--tagged] [--api chat|messages|responses]
    .venv/bin/python -m bench.request_path --cost-ab [--calls 3000] [--rounds 6] [--api ...]

--tagged: each call carries attribution (a `user`, a 3-entry body `metadata` and an X-Tollway-Tags header).
--api messages: drives Anthropic's /v1/messages (x-api-key, anthropic-version) instead of chat;
--api responses: OpenAI's /v1/responses (a stored response: its id is wrapped).
--cost-ab: what the provisional cost (services/proxy/cost.py: the x-tollway-cost-usd header and its price
version) costs per call, measured in one run on one app: blocks of 100 calls alternate (ABBA) between the real
quote and `no_quote` (the answer with no cost and no headers, as before the feature; the quota's settle then
prices the call itself, as it did before); a round is `calls` calls of each. Printed: every round's CPU per
call of each side and their difference, the medians over the rounds, and the median difference over every
pair of adjacent blocks (the figure least moved by a busy moment of a shared box). --null puts the stub on
both sides: what the A/B reads with no difference at all (its noise floor on the box at the time). Issue 16 budgets the difference at
5 us.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import chat_body, messages_body
from bench.proxy_bench import responses_body
from bench.targets import tollway_config
from schemas.config import GatewayConfig
from schemas.control import KeyState, TeamState
from schemas.keys import display_prefix, hash_key, new_secret
from services.proxy import handler
from services.proxy.app import create_app
from services.proxy.cost import Quote
from services.proxy.settings import ProxySettings
from services.proxy.upstream import UpstreamReply

REPLY = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 300},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 200, "completion_tokens": 64, "total_tokens": 264}})  # fmt: skip


MESSAGES_REPLY = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                               "content": [{"type": "text", "text": "x" * 300}], "stop_reason": "end_turn",
                               "stop_sequence": None,
                               "usage": {"input_tokens": 150, "cache_read_input_tokens": 30,
                                         "cache_creation_input_tokens": 20, "output_tokens": 64,
                                         "cache_creation": {"ephemeral_5m_input_tokens": 20,
                                                            "ephemeral_1h_input_tokens": 0},
                                         "service_tier": "standard"}})  # fmt: skip
RESPONSES_REPLY = orjson.dumps({"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
                                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                                            "content": [{"type": "output_text", "text": "x" * 300, "annotations": []}]}],
                                "usage": {"input_tokens": 200, "input_tokens_details": {"cached_tokens": 0},
                                          "output_tokens": 64, "output_tokens_details": {"reasoning_tokens": 0},
                                          "total_tokens": 264}})  # fmt: skip
# api -> (path, body, auth header, canned answer)
APIS = {
    "chat": ("/v1/chat/completions", chat_body("bench-instant"), "authorization", REPLY),
    "messages": ("/v1/messages", messages_body("bench-claude-instant"), "x-api-key", MESSAGES_REPLY),
    "responses": ("/v1/responses", responses_body("bench-instant"), "authorization", RESPONSES_REPLY),
}


class _NoCost(Quote):
    __slots__ = ()

    def headers(self) -> dict[str, str]:
        return {}


NO_COST = _NoCost("unpriced", "", "")


def no_quote(*args: Any, **kwargs: Any) -> Quote:
    """The quote path disabled (this bench only): no pricing, no cost headers, nothing told to keep."""
    return NO_COST


async def measure(calls: int, profile: bool = False, tagged: bool = False, api: str = "chat",
                  ab_rounds: int = 0, null: bool = False) -> Any:  # fmt: skip
    """CPU seconds per call (best of 3 rounds); with ab_rounds, the --cost-ab report (a dict) instead."""
    reply = APIS[api][3]

    async def canned(pool, target, path, body, budget_s=None, headers=None) -> UpstreamReply:
        return UpstreamReply(200, reply, orjson.loads(reply), None)

    real = handler.post_json  # every API's plain call goes through it (ProxyHandler.json_attempt)
    # the upstream hop is measured elsewhere (the floor rows of bench.run)
    handler.post_json = canned
    try:
        return await _measure(calls, profile, tagged, api, ab_rounds, null)
    finally:
        handler.post_json = real


@contextlib.asynccontextmanager
async def serving(config: GatewayConfig) -> AsyncIterator[tuple[Any, str]]:
    """(the proxy's ASGI app, started, and a key of team t1 on the `bench` plan). No broker: the emitter keeps
    retrying in the background and every event lands in the spool."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ProxySettings(data_dir=Path(tmp), proxy_instance="bench"), config, "127.0.0.1:1")
        async with app.router.lifespan_context(app):
            secret = new_secret()
            app.state.proxy.control.apply(TeamState(team_id="t1", name="t1", plan="bench"))
            app.state.proxy.control.apply(KeyState(key_id="k1", key_hash=hash_key(secret), prefix=display_prefix(secret),
                                          team_id="t1"))  # fmt: skip
            yield app, secret


def caller(app: Any, secret: str, api: str, tagged: bool = False) -> tuple[Callable[[], Awaitable[None]], list[int]]:
    """(one call of `api` straight into the ASGI app, the statuses it answered)."""
    path, payload, auth, _ = APIS[api]
    extra = {"user": "end-user-1", "metadata": {"project": "apollo", "env": "prod", "ticket": "T-1"}}
    body = orjson.dumps({**payload, **(extra if tagged and api == "chat" else {})})
    credential = f"Bearer {secret}" if auth == "authorization" else secret
    headers = [(b"host", b"proxy"), (b"content-type", b"application/json"),
               (auth.encode(), credential.encode()), (b"content-length", b"%d" % len(body))]  # fmt: skip
    if api == "messages":
        headers.append((b"anthropic-version", b"2023-06-01"))
    if tagged:
        headers.append((b"x-tollway-tags", b"team=search,feature=rerank"))
    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8080)}  # fmt: skip
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return pending.pop() if pending else {"type": "http.disconnect"}

        await app(scope, receive, send)

    return one, statuses


async def _measure(calls: int, profile: bool, tagged: bool, api: str = "chat", ab_rounds: int = 0,
                   null: bool = False) -> Any:  # fmt: skip
    config = GatewayConfig.model_validate(
        tollway_config({"instant": "http://127.0.0.1:9", "50ms": "http://127.0.0.1:9"})
    )
    async with serving(config) as (app, secret):
        one, statuses = caller(app, secret, api, tagged)
        for _ in range(1000):  # warm-up
            await one()
        if ab_rounds:
            report = await _cost_ab(one, calls, ab_rounds, api, null=null)
            if set(statuses) != {200}:
                raise SystemExit(f"the request path did not answer 200: {sorted(set(statuses))}")
            return report
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


async def _cost_ab(one: Any, calls: int, rounds: int, api: str, block: int = 100, null: bool = False
                   ) -> dict[str, Any]:  # fmt: skip
    real = handler.quote
    if real is no_quote:
        raise SystemExit("handler.quote is already the stub")
    if null:  # both sides the stub: what the A/B reads when there is no difference (its noise and bias)

        def real(*args: Any, **kwargs: Any) -> Quote:
            return NO_COST

    async def cpu(quote_fn: Any) -> float:
        handler.quote = quote_fn
        try:
            t0 = time.process_time()
            for _ in range(block):
                await one()
            return time.process_time() - t0
        finally:
            handler.quote = real

    pairs, all_diffs = [], []
    for _ in range(rounds):
        # Blocks of `block` calls alternate ABBA, so the box's load, which moves over seconds, weighs on both
        # sides alike; a round is `calls` calls of each.
        with_s = without_s = 0.0
        diffs = []  # per pair of adjacent blocks, us per call
        for i in range(max(1, calls // block)):
            if i % 2 == 0:
                w = await cpu(real)
                wo = await cpu(no_quote)
            else:
                wo = await cpu(no_quote)
                w = await cpu(real)
            with_s, without_s = with_s + w, without_s + wo
            diffs.append((w - wo) / block * 1e6)
        n = max(1, calls // block) * block
        w, wo = with_s / n * 1e6, without_s / n * 1e6
        pairs.append({"with_cost_us": round(w, 2), "without_us": round(wo, 2), "diff_us": round(w - wo, 2),
                      "block_median_diff_us": round(statistics.median(diffs), 2)})  # fmt: skip
        all_diffs += diffs
    return {
        "api": api,
        "calls_per_round": calls,
        "block": block,
        "pairs": pairs,
        "median_with_cost_us": round(statistics.median(p["with_cost_us"] for p in pairs), 2),
        "median_without_us": round(statistics.median(p["without_us"] for p in pairs), 2),
        "median_diff_us": round(statistics.median(p["diff_us"] for p in pairs), 2),
        # the median over every pair of adjacent blocks: the least moved by a busy second of the box
        "median_block_diff_us": round(statistics.median(all_diffs), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of one more round")
    ap.add_argument("--tagged", action="store_true", help="calls carry a user, body metadata and a tags header")
    ap.add_argument("--api", choices=sorted(APIS), default="chat")
    ap.add_argument("--cost-ab", action="store_true", help="same-run A/B of the provisional cost (see above)")
    ap.add_argument("--rounds", type=int, default=6, help="--cost-ab: rounds")
    ap.add_argument("--null", action="store_true", help="--cost-ab with the stub on both sides: the noise floor")
    args = ap.parse_args()
    if args.cost_ab:
        report = asyncio.run(measure(args.calls, api=args.api, ab_rounds=args.rounds, null=args.null))
        print(
            orjson.dumps({**report, "null": args.null, "load_average": [round(x, 2) for x in os.getloadavg()]}).decode()
        )
        return
    us = asyncio.run(measure(args.calls, args.profile, args.tagged, args.api)) * 1e6
    print(orjson.dumps({"request_path_cpu_us_per_call": round(us, 1), "calls": args.calls, "api": args.api}).decode())


if __name__ == "__main__":
    main()
