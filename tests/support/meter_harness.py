"""Helpers for meter and pipeline tests: private topics, producing, a flaky Store, a meter task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from services.meter.consumer import run_meter
from services.meter.settings import MeterSettings


async def create_topic(bootstrap: str, name: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes | None]]) -> dict[int, int]:
    """Send and await every record; returns {partition: last offset + 1} of what was written."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1024 * 1024)
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futs = [await producer.send(topic, value, key=key) for key, value in values]
        for md in await asyncio.gather(*futs):
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends


class FlakyStore:
    """A Store whose inserts raise while `failing` is set: ClickHouse down, as the meter sees it."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.failing = False
        self.failed_attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _fail_if_down(self) -> None:
        if self.failing:
            self.failed_attempts += 1
            raise ConnectionError("injected: ClickHouse unavailable")

    # Every write path the meter has: Arrow (its main one), columns (fallback), rows.
    async def insert_raw(self, *a: Any, **kw: Any) -> None:
        self._fail_if_down()
        await self._inner.insert_raw(*a, **kw)

    async def insert_columns(self, *a: Any, **kw: Any) -> None:
        self._fail_if_down()
        await self._inner.insert_columns(*a, **kw)

    async def insert_rows(self, *a: Any, **kw: Any) -> None:
        self._fail_if_down()
        await self._inner.insert_rows(*a, **kw)


@contextlib.asynccontextmanager
async def meter_task(
    settings: MeterSettings, config: GatewayConfig, store: Any, bootstrap: str
) -> AsyncIterator[asyncio.Task[None]]:
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_meter(settings, config, store, bootstrap, stop, started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
