"""Follow `tollway.control.v1` from the beginning into the KeyView (every replica reads all of it)."""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas.control import CONTROL_TOPIC, decode
from services.proxy.auth import KeyView

log = structlog.get_logger("tollway.proxy.control")


class ControlListener:
    def __init__(self, bootstrap: str, view: KeyView) -> None:
        self.bootstrap = bootstrap
        self.view = view
        self.caught_up = asyncio.Event()  # set once the backlog present at start has been applied
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._follow(stop)
            except Exception as err:  # broker gone: keep the view we have, reconnect
                log.warning("control_listener_error", error=str(err)[:200])
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def _follow(self, stop: asyncio.Event) -> None:
        # A short fetch wait: the topic is tiny, and a new or revoked key should take effect in milliseconds.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None, fetch_max_wait_ms=20
        )
        await consumer.start()
        try:
            tp = TopicPartition(CONTROL_TOPIC, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while not stop.is_set():
                batch = await consumer.getmany(tp, timeout_ms=100, max_records=5000)
                for record in batch.get(tp, []):
                    try:
                        self.view.apply(decode(record.value))
                        self.applied += 1
                    except (ValidationError, ValueError) as err:
                        log.warning("control_message_invalid", offset=record.offset, error=str(err)[:200])
                hw = consumer.highwater(tp)
                if not self.caught_up.is_set() and hw is not None and await consumer.position(tp) >= hw:
                    self.caught_up.set()
                    log.info("control_caught_up", messages=self.applied, keys=len(self.view.keys_by_hash))
        finally:
            await consumer.stop()
