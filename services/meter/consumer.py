"""The meter service: its Kafka clients, the pipeline (pipeline.py: fetch, price, write, commit) and the
background passes (re-pricing held events, rollups), started and stopped together."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.price_versions import record_in_force
from schemas.prices import PriceBook
from services.meter.columnar import decode_and_price_columnar
from services.meter.dlq import DeadLetterSink
from services.meter.pipeline import MeterPipeline
from services.meter.rerate import price_held
from services.meter.rollups import run_rollups
from services.meter.settings import MeterSettings
from services.meter.writer import UsageWriter

log = structlog.get_logger("tollway.meter")


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
    decoder = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="meter-decode")
    pipeline = MeterPipeline(consumer, writer, DeadLetterSink(producer), book, decode_and_price_columnar, decoder,
                             batch_max_rows=settings.batch_max_rows, batch_max_wait_ms=settings.batch_max_wait_ms,
                             future_tolerance_s=settings.future_tolerance_s, depth=settings.pipeline_depth)  # fmt: skip
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
    try:
        if not await pipeline.run(stop, stop):
            return
        if drain:
            # Shutting down with a broker that forgets (the bundled one): take what is left first.
            await pipeline.run(None, never, time.monotonic() + drain_timeout_s)
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
