"""The meter's stages as one class: fetch a batch, price it, write it (rows, then dead letters), then commit.

Each stage runs on its own thread so the two cores overlap them: the event loop fetches batch N+2 (aiokafka,
GIL), a decode thread prices batch N+1 (the pyarrow parse runs off the GIL), and the writer task has batch N
inserted (off the GIL, on the ClickHouse thread) and committed. Batches are written and committed strictly in
fetch order, one at a time, and a batch that could not be written stops everything after it: nothing is ever
committed past an unwritten batch. A crash anywhere before the commit replays the batch; event_id dedup in
ClickHouse absorbs the replay.

The pipeline only talks to its collaborators through a few calls (consumer: getmany, commit, committed, seek,
assignment, highwater, position; writer: insert, insert_dead; dead letters: send), so tests drive it with
fakes and no broker (tests/unit/test_meter_pipeline_stages.py), the way aiokafka tests its Sender.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import structlog
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.prices import PriceBook
from services.meter import metrics
from services.meter.batch import PricedBatch
from services.meter.dead_letters import DeadLetter
from services.meter.positions import CommitGuard

log = structlog.get_logger("tollway.meter")

Decode = Callable[[list[Any], PriceBook, float], tuple[PricedBatch, list[DeadLetter]]]


async def fetch_batch(consumer: Any, max_rows: int, max_wait_ms: int) -> list:
    """Gather up to `max_rows` records, waiting at most `max_wait_ms` once the first has arrived."""
    records: list = []
    deadline = time.monotonic() + max_wait_ms / 1000
    while len(records) < max_rows:
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        got = await consumer.getmany(
            timeout_ms=remaining_ms if records else max_wait_ms, max_records=max_rows - len(records)
        )
        for part in got.values():
            records.extend(part)
        if not got and (records or time.monotonic() >= deadline):
            break
        if time.monotonic() >= deadline:
            break
    return records


async def update_lag(consumer: Any) -> None:
    # highwater() is what the fetch saw; on tansu it is right where end_offsets() is not.
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is not None:
            metrics.LAG.labels(str(tp.partition)).set(max(0, hw - await consumer.position(tp)))


class MeterPipeline:
    def __init__(self, consumer: Any, writer: Any, dead_letters: Any, book: PriceBook, decode: Decode,
                 decoder: Executor, *, batch_max_rows: int, batch_max_wait_ms: int, future_tolerance_s: float,
                 depth: int, guard: CommitGuard | None = None) -> None:  # fmt: skip
        self.consumer = consumer
        self.writer = writer
        self.dead_letters = dead_letters
        self.book = book
        self.decode = decode
        self.decoder = decoder
        self.batch_max_rows = batch_max_rows
        self.batch_max_wait_ms = batch_max_wait_ms
        self.future_tolerance_s = future_tolerance_s
        self.depth = depth
        # commits only what the broker's committed offsets prove safe (positions.py)
        self.guard = guard or CommitGuard()

    async def fetch(self) -> list:
        return await fetch_batch(self.consumer, self.batch_max_rows, self.batch_max_wait_ms)

    def price(self, records: list) -> asyncio.Future:
        """Decode and price on the decoder thread; the future gives (batch, dead letters)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.decoder, self.decode, records, self.book, self.future_tolerance_s)

    async def write(self, batch: PricedBatch, dead: list[DeadLetter], give_up: asyncio.Event) -> bool:
        """Rows, then dead letters (table and topic). False if `give_up` was set while a write kept failing."""
        if not await self.writer.insert(batch, give_up) or not await self.writer.insert_dead(dead, give_up):
            log.warning("meter_stopping_uncommitted", rows=batch.rows)  # replayed on next start
            return False
        await self.dead_letters.send(dead)
        metrics.DEAD_LETTERS.inc(len(dead))
        metrics.FUTURE_EVENTS.inc(sum(d.future for d in dead))
        return True

    async def commit(self, batch: PricedBatch, dead: list[DeadLetter]) -> None:
        """Only after `write`: the rows are safe. A lost rebalance is not an error (the new owner replays)."""
        try:
            await self.guard.commit(self.consumer, batch.spans)
        except (CommitFailedError, KafkaError) as err:
            metrics.COMMIT_FAILURES.inc()
            log.warning("commit_failed", error=str(err)[:200])
        metrics.EVENTS.labels("written").inc(batch.rows)
        metrics.EVENTS.labels("dead").inc(len(dead))
        metrics.EVENTS.labels("unpriced").inc(batch.unpriced)
        await update_lag(self.consumer)
        log.debug("batch_committed", rows=batch.rows, dead=len(dead), unpriced=batch.unpriced,
                  partitions={f"{t}:{p}": [a, b] for (t, p), (a, b) in batch.spans.items()})  # fmt: skip

    async def _write_in_order(self, queue: asyncio.Queue, give_up: asyncio.Event) -> bool:
        """Write and commit each priced batch in turn; False once one could not be written (stop now)."""
        while (pending := await queue.get()) is not None:
            batch, dead = await pending
            if not await self.write(batch, dead, give_up):
                return False  # never written or committed: replayed on next start
            await self.commit(batch, dead)
        return True

    @staticmethod
    async def _hand_over(queue: asyncio.Queue, item: asyncio.Future | None, writer: asyncio.Task) -> bool:
        """Queue `item` for the writer: a full queue waits for it, and a writer that stopped ends the wait."""
        if writer.done():
            return False
        put = asyncio.ensure_future(queue.put(item))
        await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            return False
        return True

    async def run(self, until: asyncio.Event | None, give_up: asyncio.Event, deadline: float | None = None) -> bool:
        """Fetch, price, write and commit until `until` is set, the log is drained (until=None), `deadline`
        (monotonic) passed, or a write gave up. True if every batch fetched was written and committed."""
        queue: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(maxsize=self.depth)
        writer = asyncio.create_task(self._write_in_order(queue, give_up), name="meter-writer")
        try:
            while not writer.done() and not (until is not None and until.is_set()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                records = await self.fetch()
                if not records:
                    if until is None:
                        break  # drained
                    continue
                if not await self._hand_over(queue, self.price(records), writer):
                    break
            await self._hand_over(queue, None, writer)
            return await writer
        finally:
            if not writer.done():  # cancelled mid-loop: never leave a write/commit running unseen
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            while not queue.empty():  # priced but never written: replayed on next start
                if (left := queue.get_nowait()) is not None:
                    left.cancel()
