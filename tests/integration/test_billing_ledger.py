"""The ledger over rows the meter's own pricing wrote: amounts recomputed here from the config's prices
(typed in again, not read from the code under test), before and after a rerate to a new price."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, Price, load_config
from schemas.prices import PriceBook
from services.billing import ledger
from services.meter.pricing import decode_and_price
from services.meter.rerate import rerate_period
from services.meter.writer import UsageWriter
from tests.support.events import make_event

CONFIG = load_config("tollway.yaml")
# USD per 1M tokens of tollway.yaml, and the October price the rerate applies.
OLD = {"input": Decimal("2.00"), "cached_input": Decimal("0.50"), "output": Decimal("8.00")}
NEW = {"input": Decimal("2.20"), "cached_input": Decimal("0.55"), "output": Decimal("8.80")}
MINI = {"input": Decimal("0.40"), "cached_input": Decimal("0.10"), "output": Decimal("1.60")}
_offsets = itertools.count(10_000)


def oct_(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 10, day, hour, tzinfo=UTC)


async def meter(store: Store, events: list, config: GatewayConfig = CONFIG) -> None:
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=next(_offsets), key=None,
                               value=e.to_bytes()) for e in events]  # fmt: skip
    batch, dead = decode_and_price(records, PriceBook(config))
    assert not dead
    assert await UsageWriter(store).insert(batch, asyncio.Event())


def repriced() -> GatewayConfig:
    """tollway.yaml with a gpt-4.1 price in force from 2026-10-10 (a price change, then a rerate)."""
    data = CONFIG.model_dump()
    data["models"]["gpt-4.1"]["prices"].append(Price(effective_from=date(2026, 10, 10), **NEW).model_dump())
    return GatewayConfig.model_validate(data)


def cost(e, prices: dict[str, Decimal]) -> Decimal:
    cached = min(e.cached_tokens, e.prompt_tokens)
    return (Decimal(e.prompt_tokens - cached) * prices["input"] + Decimal(cached) * prices["cached_input"]
            + Decimal(e.completion_tokens) * prices["output"]) / 1_000_000  # fmt: skip


def expected(events: list, after_rerate: bool) -> Decimal:
    total = Decimal(0)
    for e in events:
        if e.status not in ("ok", "error"):
            continue
        if e.served_model == "gpt-4.1-mini":
            total += cost(e, MINI)
        else:
            total += cost(e, NEW if after_rerate and e.occurred_at.day >= 10 else OLD)
    return total


def month(tid: str) -> list:
    return [
        make_event(tid, occurred_at=oct_(2), prompt_tokens=123_457, completion_tokens=98_765, cached_tokens=23_456),
        make_event(tid, occurred_at=oct_(12), prompt_tokens=1_000_001, completion_tokens=3),
        make_event(tid, occurred_at=oct_(15), prompt_tokens=7_777, completion_tokens=555, cached_tokens=7_000,
                   status="error", http_status=502),
        make_event(tid, occurred_at=oct_(20), served_model="gpt-4.1-mini", requested_model="gpt-4.1-mini",
                   prompt_tokens=777_777, completion_tokens=55_555, cached_tokens=100_000),
        make_event(tid, occurred_at=oct_(21), status="cached", cache_hit=True, prompt_tokens=999,
                   completion_tokens=9),
        make_event(tid, occurred_at=oct_(22), status="rejected", http_status=404, requested_model="no-such-model",
                   served_model="", provider="", prompt_tokens=0, completion_tokens=0),
    ]  # fmt: skip


async def test_ledger_team_month_is_the_config_prices_before_and_after_a_rerate(store: Store) -> None:
    events = month("team-ledger")
    await meter(store, events)
    await meter(store, events[:3])  # a replayed batch: one row per event
    tm = await ledger.team_month(store, "team-ledger", "2026-10")
    assert tm.exact_usd == expected(events, after_rerate=False) and tm.unpriced == 0
    assert sum(g.requests for g in tm.groups if g.model == "gpt-4.1") == 3

    await rerate_period(store, PriceBook(repriced()), "2026-10")
    tm = await ledger.team_month(store, "team-ledger", "2026-10")
    assert tm.exact_usd == expected(events, after_rerate=True)
    versions = {(g.model, g.unit_input) for g in tm.groups}
    assert versions == {("gpt-4.1", OLD["input"]), ("gpt-4.1", NEW["input"]), ("gpt-4.1-mini", MINI["input"])}
    for g in tm.groups:  # every group's amount is its tokens at its own unit prices
        assert g.exact_usd == sum(Decimal(line.quantity) * line.unit_usd_per_1m / 1_000_000 for line in g.lines())

    (mtd,) = [m for m in await ledger.month_to_date(store, "2026-10") if m.team_id == "team-ledger"]
    assert mtd.usd == expected(events, after_rerate=True)
    assert mtd.tokens == sum(e.prompt_tokens + e.completion_tokens for e in events if e.status in ("ok", "error"))


async def test_one_group_never_merges_two_unit_prices_under_one_version(store: Store) -> None:
    """An in-place price edit keeps the version string; the ledger still keeps the two prices apart."""
    edited = CONFIG.model_dump()
    edited["models"]["gpt-4.1"]["prices"][0].update(input=Decimal("3.00"))
    a = make_event("team-edit", occurred_at=oct_(3), prompt_tokens=1_000, completion_tokens=10)
    b = make_event("team-edit", occurred_at=oct_(4), prompt_tokens=2_000, completion_tokens=20)
    await meter(store, [a])
    await meter(store, [b], GatewayConfig.model_validate(edited))
    tm = await ledger.team_month(store, "team-edit", "2026-10")
    assert len(tm.groups) == 2 and len({g.price_version for g in tm.groups}) == 1
    want = cost(a, OLD) + cost(b, OLD | {"input": Decimal("3.00")})
    assert tm.exact_usd == want


def test_report_model_buckets_names_the_config_does_not_know() -> None:
    assert ledger.report_model("gpt-4.1", CONFIG) == "gpt-4.1"
    assert ledger.report_model("gpt-4", CONFIG) == "gpt-4"  # an alias is a known name
    assert ledger.report_model("\x1b[31mhello", CONFIG) == ledger.UNKNOWN_MODEL
