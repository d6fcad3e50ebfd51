"""Billing's Kafka producers (control outbox, alerts): started on demand, so billing never needs the broker
to start. A failed start closes what it opened; the caller retries with its own backoff."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer


async def started_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    # A dead broker fails a send in seconds, not aiokafka's 40 s default: both callers retry anyway.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, request_timeout_ms=5000,
                                **options)  # fmt: skip
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer
