"""CPU per call of the provisional cost alone (services/proxy/cost.py), in process: `quote()` on a chat call's
usage (200 prompt / 64 completion tokens at the bench model's price), the headers it adds, and the pricing
function under it. The request-path cost of the feature, header included, is `bench.request_path --cost-ab`.

    .venv/bin/python -m bench.cost_quote [--calls 100000] [--rounds 20]

The cases run interleaved in `rounds` slices of calls/rounds each; each figure is the best slice (process CPU
time / calls): the one least disturbed by other work on the box.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from bench.targets import tollway_config
from schemas.config import GatewayConfig
from schemas.prices import price_usage
from services.proxy.cost import QuoteBook, quote
from services.proxy.tokens import TokenUsage


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def run(calls: int, rounds: int) -> dict[str, float]:
    config = GatewayConfig.model_validate(
        tollway_config({"instant": "http://127.0.0.1:9", "50ms": "http://127.0.0.1:9"})
    )
    book = QuoteBook(config)
    model = "bench-instant"
    provider = config.models[model].routes[0].provider
    usage, now = TokenUsage(200, 64, 0), datetime.now(UTC)
    if not quote(book, model, provider, now, "ok", usage).usd:
        raise SystemExit("the bench model has no price: nothing to measure")
    cases = {
        "price_usage_us": lambda: price_usage(book, model, provider, now, "ok", usage),
        "quote_us": lambda: quote(book, model, provider, now, "ok", usage),
        "quote_and_headers_us": lambda: quote(book, model, provider, now, "ok", usage).headers(),
    }
    per_call_us(cases["quote_us"], calls // 10)  # warm-up (the book's memo, the Decimal caches)
    seen: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):  # the cases interleaved, so a busy moment of the box hits them alike
        for name, fn in cases.items():
            seen[name].append(per_call_us(fn, calls // rounds))
    return {name: round(min(v), 2) for name, v in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    print(orjson.dumps({**run(args.calls, args.rounds), "calls": args.calls, "rounds": args.rounds}).decode())


if __name__ == "__main__":
    main()
