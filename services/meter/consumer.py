"""The meter loop: fetch a batch, price it, insert it, dead-letter the bad, then (only then) commit.

A crash anywhere before the commit replays the batch; event_id dedup in ClickHouse absorbs the replay.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.prices import PriceBook
from services.meter import metrics
from services.meter.columnar import decode_and_price_columnar
from services.meter.dlq import DeadLetterSink
from services.meter.positions import CommitGuard
from services.meter.pricing import DeadLetter, PricedBatch
from services.meter.rerate import price_held
from services.meter.rollups import run_rollups
from services.meter.settings import MeterSettings
from services.meter.writer import UsageWriter

log = structlog.get_logger("tollway.meter")


async def fetch_batch(consumer: AIOKafkaConsumer, max_rows: int, max_wait_ms: int) -> list:
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


async def update_lag(consumer: AIOKafkaConsumer) -> None:
    # highwater() is what the fetch saw; on tansu it is right where end_offsets() is not.
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is not None:
            metrics.LAG.labels(str(tp.partition)).set(max(0, hw - await consumer.position(tp)))


async def run_meter(
    settings: MeterSettings,
    config: GatewayConfig,
    store: Store,
    bootstrap: str,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    drain: bool = False,
    drain_timeout_s: float = 15.0,
) -> None:
    book = PriceBook(config)
    writer = UsageWriter(store, settings.insert_backoff_max_s)
    consumer = AIOKafkaConsumer(
        settings.usage_topic,
        bootstrap_servers=bootstrap,
        group_id=settings.meter_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        session_timeout_ms=settings.meter_session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.meter_session_timeout_ms // 3),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    await consumer.start()
    dlq = DeadLetterSink(producer)
    guard = CommitGuard()  # commits only what the broker's committed offsets prove safe (positions.py)
    log.info("meter_started", group=settings.meter_group, bootstrap=bootstrap)
    if started:
        started.set()
    never = asyncio.Event()  # a drain must finish its inserts even though `stop` is set
    background_stop = asyncio.Event()
    background = [
        asyncio.create_task(reprice_loop(store, book, background_stop, settings.reprice_interval_s), name="reprice"),
        asyncio.create_task(
            run_rollups(store, background_stop, settings.rollup_interval_s, settings.rollup_catchup_s), name="rollups"
        ),
    ]

    async def finish(batch: PricedBatch, dead: list[DeadLetter], give_up: asyncio.Event) -> bool:
        # Rows, then dead letters (topic and table), then the commit: a crash anywhere replays the batch.
        if not await writer.insert(batch, give_up) or not await writer.insert_dead(dead, give_up):
            log.warning("meter_stopping_uncommitted", rows=batch.rows)  # replayed on next start
            return False
        await dlq.send(dead)
        metrics.DEAD_LETTERS.inc(len(dead))
        try:
            await guard.commit(consumer, batch.spans)
        except (CommitFailedError, KafkaError) as err:
            # Lost the partitions to a rebalance: the new owner replays, dedup absorbs it.
            metrics.COMMIT_FAILURES.inc()
            log.warning("commit_failed", error=str(err)[:200])
        metrics.EVENTS.labels("written").inc(batch.rows)
        metrics.EVENTS.labels("dead").inc(len(dead))
        metrics.EVENTS.labels("unpriced").inc(batch.unpriced)
        await update_lag(consumer)
        log.debug("batch_committed", rows=batch.rows, dead=len(dead), unpriced=batch.unpriced,
                  partitions={f"{t}:{p}": [a, b] for (t, p), (a, b) in batch.spans.items()})  # fmt: skip
        return True

    # Two-stage pipeline: while batch N is written and committed (its insert runs on the ClickHouse thread,
    # off the GIL), batch N+1 is fetched and priced here. At most one batch is in flight and the next one
    # starts only after it committed, so commits stay in offset order and a batch that could not be written
    # stops everything after it (nothing later is ever committed past an uncommitted batch).
    in_flight: asyncio.Task[bool] | None = None

    async def handed_over(records: list, give_up: asyncio.Event) -> bool:
        """Price `records`, wait for the batch in flight, then put this one in flight. False: stop now."""
        nonlocal in_flight
        batch, dead = decode_and_price_columnar(records, book)
        if in_flight is not None:
            ok = await in_flight
            in_flight = None
            if not ok:
                return False  # this batch was never written or committed: replayed on next start
        in_flight = asyncio.create_task(finish(batch, dead, give_up), name="meter-batch")
        return True

    async def settle() -> bool:
        nonlocal in_flight
        if in_flight is None:
            return True
        try:
            return await in_flight
        finally:
            in_flight = None

    try:
        while not stop.is_set():
            records = await fetch_batch(consumer, settings.batch_max_rows, settings.batch_max_wait_ms)
            if records and not await handed_over(records, stop):
                return
        if not await settle():
            return
        if drain:
            # Shutting down with a broker that forgets (the bundled one): take what is left first.
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline:
                records = await fetch_batch(consumer, settings.batch_max_rows, settings.batch_max_wait_ms)
                if not records or not await handed_over(records, never):
                    break
            await settle()
    finally:
        if in_flight is not None:  # cancelled or failed mid-loop: never leave a write/commit running unseen
            in_flight.cancel()
            await asyncio.gather(in_flight, return_exceptions=True)
        background_stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
        log.info("meter_stopped")


async def reprice_loop(store: Store, book: PriceBook, stop: asyncio.Event, interval_s: float) -> None:
    """Held (unpriced) events get priced as soon as this meter's catalog has a price for them."""
    while True:
        try:
            await price_held(store, book)
        except Exception as err:
            log.warning("reprice_failed", error=str(err)[:300])
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return
        except TimeoutError:
            pass
