"""Usage rows written the way the meter writes them: its own decode-and-price and writer, real ClickHouse."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.events import UsageEvent
from schemas.prices import PriceBook
from services.meter.pricing import decode_and_price
from services.meter.writer import UsageWriter

_offsets = itertools.count(1_000_000)


async def meter(store: Store, events: list[UsageEvent], config: GatewayConfig) -> None:
    """Price `events` with `config`'s catalog and insert them (fresh offsets per call, as a new batch)."""
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=next(_offsets), key=None,
                               value=e.to_bytes()) for e in events]  # fmt: skip
    batch, dead = decode_and_price(records, PriceBook(config))
    assert not dead
    assert await UsageWriter(store).insert(batch, asyncio.Event())
