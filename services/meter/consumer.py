"""The meter loop: fetch a batch, price it, insert it, dead-letter the bad, then (only then) commit.

A crash anywhere before the commit replays the batch; event_id dedup in ClickHouse absorbs the replay.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.price_versions import record_in_force
from schemas.prices import PriceBook
from services.meter import metrics
from services.meter.batch import PricedBatch
from services.meter.columnar import decode_and_price_columnar
from services.meter.dead_letters import DeadLetter
from services.meter.dlq import DeadLetterSink
from services.meter.positions import CommitGuard
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
        asyncio.create_task(
            reprice_loop(store, config, book, background_stop, settings.reprice_interval_s), name="reprice"
        ),
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
        metrics.FUTURE_EVENTS.inc(sum(d.future for d in dead))
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

    # Three stages, each on its own thread so the two cores overlap them: this loop fetches batch N+2 (aiokafka,
    # GIL), a decode thread prices batch N+1 (the pyarrow parse runs off the GIL), and `write_in_order` has
    # batch N inserted (off the GIL, on the ClickHouse thread) and committed. Batches are written and committed
    # strictly in fetch order, one at a time, and a batch that could not be written stops everything after it:
    # nothing is ever committed past an unwritten batch.
    decoder = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="meter-decode")
    decoded: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(maxsize=settings.pipeline_depth)
    loop = asyncio.get_running_loop()

    async def write_in_order(give_up: asyncio.Event) -> bool:
        """Write and commit each decoded batch in turn; False once one could not be written (stop now)."""
        while (pending := await decoded.get()) is not None:
            batch, dead = await pending
            if not await finish(batch, dead, give_up):
                return False  # never written or committed: replayed on next start
        return True

    async def hand_over(item: asyncio.Future | None, writer: asyncio.Task) -> bool:
        """Queue `item` for the writer: a full queue waits for it, and a writer that stopped ends the wait."""
        if writer.done():
            return False
        put = asyncio.ensure_future(decoded.put(item))
        await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            return False
        return True

    async def pump(until: asyncio.Event | None, give_up: asyncio.Event, deadline: float | None = None) -> bool:
        """Fetch and hand batches to the decoder until `until` is set, the log is drained (until=None) or the
        writer stopped. True if the writer finished everything it was handed."""
        writer = asyncio.create_task(write_in_order(give_up), name="meter-writer")
        try:
            while not writer.done() and not (until is not None and until.is_set()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                records = await fetch_batch(consumer, settings.batch_max_rows, settings.batch_max_wait_ms)
                if not records:
                    if until is None:
                        break  # drained
                    continue
                decoding = loop.run_in_executor(decoder, decode_and_price_columnar, records, book,
                                                settings.future_tolerance_s)  # fmt: skip
                if not await hand_over(decoding, writer):
                    break
            await hand_over(None, writer)
            return await writer
        finally:
            if not writer.done():  # cancelled mid-loop: never leave a write/commit running unseen
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            while not decoded.empty():  # decoded but never written: replayed on next start
                if (left := decoded.get_nowait()) is not None:
                    left.cancel()

    try:
        if not await pump(stop, stop):
            return
        if drain:
            # Shutting down with a broker that forgets (the bundled one): take what is left first.
            await pump(None, never, time.monotonic() + drain_timeout_s)
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)
        background_stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
        log.info("meter_stopped")


async def reprice_loop(store: Store, config: GatewayConfig, book: PriceBook, stop: asyncio.Event,
                       interval_s: float) -> None:  # fmt: skip
    """Held (unpriced) events get priced as soon as this meter's catalog has a price for them; prices that came
    into force since the start are recorded (schemas/price_versions.py), so an in-place edit of one is refused."""
    while True:
        try:
            await record_in_force(store, config, "meter")
        except Exception as err:
            log.warning("price_versions_record_failed", error=str(err)[:300])
        try:
            await price_held(store, book)
        except Exception as err:
            log.warning("reprice_failed", error=str(err)[:300])
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return
        except TimeoutError:
            pass
