"""Rows written the way the meter writes them (its own decode, pricing and writer), and the month of calls
the ledger tests run, with its amounts recomputed here from prices typed in again from tollway.yaml, so a
test never trusts the code under test for the expected number."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, Price, load_config
from schemas.events import UsageEvent
from schemas.prices import PriceBook
from services.meter.reference import decode_and_price
from services.meter.writer import UsageWriter
from tests.support.events import make_event

CONFIG = load_config("tollway.yaml")
# USD per 1M tokens: tollway.yaml's gpt-4.1 and gpt-4.1-mini, and the gpt-4.1 price REPRICE_FROM brings.
OLD = {"input": Decimal("2.00"), "cached_input": Decimal("0.50"), "output": Decimal("8.00")}
NEW = {"input": Decimal("2.20"), "cached_input": Decimal("0.55"), "output": Decimal("8.80")}
MINI = {"input": Decimal("0.40"), "cached_input": Decimal("0.10"), "output": Decimal("1.60")}
REPRICE_FROM = date(2026, 10, 10)
PERIOD = "2026-10"
_offsets = itertools.count(1_000_000)


def oct_(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 10, day, hour, tzinfo=UTC)


async def meter(store: Store, events: list[UsageEvent], config: GatewayConfig = CONFIG) -> None:
    """Decode, price and insert as the meter does (fresh offsets per call, like a new batch)."""
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=next(_offsets), key=None,
                               value=e.to_bytes()) for e in events]  # fmt: skip
    batch, dead = decode_and_price(records, PriceBook(config))
    assert not dead
    assert await UsageWriter(store).insert(batch, asyncio.Event())


def repriced() -> GatewayConfig:
    """tollway.yaml plus a gpt-4.1 price in force from REPRICE_FROM on (a price change, then a rerate): its later
    entries (the 2026-12-01 one) give way, so calls of today are repriced too."""
    data = CONFIG.model_dump()
    gpt = data["models"]["gpt-4.1"]
    gpt["prices"] = [p for p in gpt["prices"] if p["effective_from"] < REPRICE_FROM]
    gpt["prices"].append(Price(effective_from=REPRICE_FROM, **NEW).model_dump())
    return GatewayConfig.model_validate(data)


def cost(e: UsageEvent, prices: dict[str, Decimal]) -> Decimal:
    cached = min(e.cached_tokens, e.prompt_tokens)
    return (Decimal(e.prompt_tokens - cached) * prices["input"] + Decimal(cached) * prices["cached_input"]
            + Decimal(e.completion_tokens) * prices["output"]) / 1_000_000  # fmt: skip


def prices_of(e: UsageEvent, after_rerate: bool) -> dict[str, Decimal]:
    if e.served_model == "gpt-4.1-mini":
        return MINI
    return NEW if after_rerate and e.occurred_at.date() >= REPRICE_FROM else OLD


def expected(events: list[UsageEvent], after_rerate: bool, model: str | None = None) -> Decimal:
    """The billable amount: ok and error calls at their price (cache hits and rejections cost nothing)."""
    return sum((cost(e, prices_of(e, after_rerate)) for e in events if e.status in ("ok", "error")
                and (model is None or (e.served_model or e.requested_model) == model)), Decimal(0))  # fmt: skip


def month(team_id: str, key_id: str = "key_test") -> list[UsageEvent]:
    """October: gpt-4.1 before and after the price change (one an upstream error with tokens), gpt-4.1-mini,
    a cache hit, and a call rejected for a made-up model."""
    return [
        make_event(team_id, key_id=key_id, occurred_at=oct_(2), prompt_tokens=123_457, completion_tokens=98_765,
                   cached_tokens=23_456),
        make_event(team_id, key_id=key_id, occurred_at=oct_(12), prompt_tokens=1_000_001, completion_tokens=3),
        make_event(team_id, key_id=key_id, occurred_at=oct_(15), prompt_tokens=7_777, completion_tokens=555,
                   cached_tokens=7_000, status="error", http_status=502),
        make_event(team_id, key_id=key_id, occurred_at=oct_(20), served_model="gpt-4.1-mini",
                   requested_model="gpt-4.1-mini", prompt_tokens=777_777, completion_tokens=55_555,
                   cached_tokens=100_000),
        make_event(team_id, key_id=key_id, occurred_at=oct_(21), status="cached", cache_hit=True, prompt_tokens=999,
                   completion_tokens=9),
        make_event(team_id, key_id=key_id, occurred_at=oct_(22), status="rejected", http_status=404,
                   requested_model="no-such-model", served_model="", provider="", prompt_tokens=0,
                   completion_tokens=0),
    ]  # fmt: skip
