"""How a long-running Kafka follower survives its broker going away, the same way in every service: run the
session until `stop`; if it fails, log it, pause (cut short by `stop`) and start a fresh one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile; True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def reconnecting(session: Callable[[], Awaitable[None]], stop: asyncio.Event, log: Any, event: str,
                       retry_s: float = 1.0) -> None:  # fmt: skip
    """`session()` again and again until `stop`; a failure is logged as `event` and retried after `retry_s`.
    What the session built up (a view, totals) is its owner's and survives the reconnect."""
    while not stop.is_set():
        try:
            await session()
        except Exception as err:  # broker gone or unreachable: keep what we have, reconnect
            log.warning(event, error=str(err)[:300])
            await pause(stop, retry_s)


async def partitions_of(consumer: Any, topic: str, stop: asyncio.Event, retry_s: float = 0.1) -> set[int]:
    """The partitions of `topic` as the broker knows them, asking again until it has the topic (it may be
    brand new, or the broker just came back empty and the topics are being created); empty if stopped."""
    parts = consumer.partitions_for_topic(topic)
    while not parts and not stop.is_set():
        await consumer._client.force_metadata_update()  # aiokafka refreshes metadata only every 5 minutes
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await pause(stop, retry_s)
    return set(parts or ())
