"""Write priced batches to ClickHouse; retry with backoff until accepted or told to stop."""

from __future__ import annotations

import asyncio
import random
import time

import structlog

from schemas.clickhouse import Store
from services.meter import metrics
from services.meter.pricing import COLUMNS, PricedBatch

log = structlog.get_logger("tollway.meter.writer")
TABLE = "usage_events"


class UsageWriter:
    def __init__(self, store: Store, backoff_max_s: float = 10.0) -> None:
        self.store = store
        self.backoff_max_s = backoff_max_s

    async def insert(self, batch: PricedBatch, stop: asyncio.Event) -> bool:
        """True once ClickHouse accepted the batch; False only if `stop` was set while it kept failing."""
        if batch.rows == 0:
            return True
        token = batch.dedup_token()
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                await self.store.insert_columns(TABLE, batch.columns, COLUMNS, dedup_token=token)
            except Exception as err:  # any engine/network failure: never drop, never crash-loop
                attempt += 1
                delay = random.uniform(0, min(self.backoff_max_s, 0.1 * 2**attempt))
                metrics.INSERT_FAILURES.inc()
                log.warning(
                    "insert_failed",
                    rows=batch.rows,
                    attempt=attempt,
                    retry_in_s=round(delay, 3),
                    error=str(err)[:300],
                )
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    return False
                except TimeoutError:
                    continue
            ms = (time.perf_counter() - t0) * 1000
            metrics.INSERT_SECONDS.observe(ms / 1000)
            metrics.BATCH_ROWS.observe(batch.rows)
            log.debug("batch_written", rows=batch.rows, insert_ms=round(ms, 1), unpriced=batch.unpriced)
            return True
