"""Dead letters: events the meter cannot accept go to `tollway.usage.dlq` with the reason and origin."""

from __future__ import annotations

import base64

import orjson
import structlog
from aiokafka import AIOKafkaProducer

from schemas.events import DLQ_TOPIC
from services.meter.dead_letters import DeadLetter

log = structlog.get_logger("tollway.meter.dlq")


def encode_dead_letter(d: DeadLetter) -> bytes:
    return orjson.dumps(
        {
            "dead_id": d.dead_id(),  # as in usage_dead_letters: the same bytes dead-lettered twice share it
            "reason": d.reason,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "key_b64": base64.b64encode(d.key).decode() if d.key is not None else None,
            "value_b64": base64.b64encode(d.value).decode() if d.value is not None else None,
        }
    )


class DeadLetterSink:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, dead: list[DeadLetter]) -> None:
        """Awaits delivery: the source offsets are committed only after the dead letters are safe."""
        if not dead:
            return
        futures = [await self.producer.send(DLQ_TOPIC, encode_dead_letter(d), key=d.key) for d in dead]
        for d, fut in zip(dead, futures, strict=True):
            await fut
            log.warning("dead_letter", reason=d.reason, topic=d.topic, partition=d.partition, offset=d.offset)
