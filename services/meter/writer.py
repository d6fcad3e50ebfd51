"""Write priced batches (and dead letters) to ClickHouse; retry with backoff until accepted or told to stop."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog

from schemas.clickhouse import Store
from services.meter import metrics
from services.meter.batch import PricedBatch
from services.meter.dead_letters import DEAD_COLUMNS, DeadLetter, dead_letter_rows
from services.meter.encode import FORMAT as ARROW_FORMAT
from services.meter.encode import ipc
from services.meter.row import COLUMNS

log = structlog.get_logger("tollway.meter.writer")
TABLE = "usage_events"
DEAD_TABLE = "usage_dead_letters"
# Skip ReplacingMergeTree's collapse of same-key rows inside one inserted block: about half the engine's
# insert CPU here. Nothing relies on it: every read is FINAL and merges collapse copies on disk anyway
# (docs/metering.md section 1, layer 1); copies inside one batch (a replay) are absorbed like any other.
RAW_INSERT_SETTINGS = {"optimize_on_insert": 0}


class UsageWriter:
    def __init__(self, store: Store, backoff_max_s: float = 10.0) -> None:
        self.store = store
        self.backoff_max_s = backoff_max_s

    async def _retry(
        self, what: str, rows: int, attempt_fn: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> bool:
        attempt = 0
        while True:
            try:
                await attempt_fn()
                return True
            except Exception as err:  # any engine/network failure: never drop, never crash-loop
                attempt += 1
                delay = random.uniform(0.5, 1.0) * min(self.backoff_max_s, 0.1 * 2**attempt)
                metrics.INSERT_FAILURES.labels(what).inc()
                log.warning("insert_failed", table=what, rows=rows, attempt=attempt, retry_in_s=round(delay, 3),
                            error=str(err)[:300])  # fmt: skip
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    return False
                except TimeoutError:
                    continue

    async def insert(self, batch: PricedBatch, stop: asyncio.Event) -> bool:
        """True once ClickHouse accepted the batch; False only if `stop` was set while it kept failing."""
        if batch.rows == 0:
            return True
        token = batch.dedup_token()

        async def attempt() -> None:
            # ingested_at is when this attempt ran: the rollup pass finds new rows by it, even after retries.
            t0 = time.perf_counter()
            await self.store.insert_raw(TABLE, ipc(batch.table, datetime.now(UTC)), COLUMNS, ARROW_FORMAT,
                                        dedup_token=token, settings=RAW_INSERT_SETTINGS)  # fmt: skip
            metrics.INSERT_SECONDS.observe(time.perf_counter() - t0)
            metrics.BATCH_ROWS.observe(batch.rows)
            log.debug("batch_written", rows=batch.rows, insert_ms=round((time.perf_counter() - t0) * 1000, 1),
                      unpriced=batch.unpriced)  # fmt: skip

        return await self._retry(TABLE, batch.rows, attempt, stop)

    async def insert_dead(self, dead: list[DeadLetter], stop: asyncio.Event) -> bool:
        if not dead:
            return True
        rows = dead_letter_rows(dead, datetime.now(UTC))
        return await self._retry(DEAD_TABLE, len(rows), lambda: self.store.insert_rows(DEAD_TABLE, rows, DEAD_COLUMNS),
                                 stop)  # fmt: skip
