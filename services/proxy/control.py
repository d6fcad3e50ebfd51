"""Follow `tollway.control.v1` from the beginning (every replica reads all of it) and hand each message to
the subscribers: the key view, the quota gate, whoever else folds control state.

The bundled broker keeps memory only: after it restarts, the log is new and starts again at offset 0, and
billing refills it. A position in the old log means nothing there, so whenever the connection to the broker
broke, or the log ends before our position, the listener starts over with a fresh consumer from the log's
start (every message is a full state, folded latest-wins: reading one twice is harmless)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.conn import CloseReason
from pydantic import ValidationError

from schemas.control import CONTROL_TOPIC, ControlMessage, decode
from schemas.reconnect import partitions_of, reconnecting

log = structlog.get_logger("tollway.proxy.control")

Subscriber = Callable[[ControlMessage], None]
REQUEST_TIMEOUT_MS = 5000
STOP_WAIT_S = 2.0
# A connection that closed for one of these may have been to a broker that is not there any more.
_LOST = frozenset((CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT, CloseReason.OUT_OF_SYNC))


class LogLost(Exception):
    """The broker connection broke or the log ends before our position: read the log again from its start."""


class ControlListener:
    def __init__(self, bootstrap: str, *subscribers: Subscriber) -> None:
        self.bootstrap = bootstrap
        self.subscribers = list(subscribers)
        self.caught_up = asyncio.Event()  # set once the backlog present at start has been applied
        self.applied = 0
        self.rereads = 0  # times the log was read again from its start (a broker restart, or a lost link)
        self._link_lost = False
        self._stopping: set[asyncio.Future[None]] = set()

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def apply(self, msg: ControlMessage) -> None:
        """One control message to every subscriber, in subscription order."""
        for subscriber in self.subscribers:
            subscriber(msg)

    async def run(self, stop: asyncio.Event) -> None:
        await reconnecting(lambda: self._follow(stop), stop, log, "control_listener_error")

    async def _follow(self, stop: asyncio.Event) -> None:
        # A short fetch wait: the topic is tiny, and a new or revoked key should take effect in milliseconds.
        # A request the broker never answers (it went away) fails in seconds, not aiokafka's 40 s default.
        # (aiokafka's metadata requests may auto-create the topic: `partitions_of` asks before anything is
        # assigned, which names no topic, so this consumer never makes one with a broker's default partitions.)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
                                    fetch_max_wait_ms=20, request_timeout_ms=REQUEST_TIMEOUT_MS)  # fmt: skip
        self._watch_links(consumer)
        await consumer.start()
        try:
            if not await partitions_of(consumer, CONTROL_TOPIC, stop):
                return  # stopped before the topic existed
            tp = TopicPartition(CONTROL_TOPIC, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while not stop.is_set():
                batch = await consumer.getmany(tp, timeout_ms=100, max_records=5000)
                hw = consumer.highwater(tp)
                if self._link_lost or (hw is not None and hw < await consumer.position(tp)):
                    # Checked before applying: a batch fetched over a new connection may come from a new log.
                    # A fresh consumer, not a seek: this one's metadata and fetch state are the old broker's.
                    self._link_lost = False
                    self.rereads += 1
                    raise LogLost(f"control log lost (highwater {hw}, position {await consumer.position(tp)})")
                for record in batch.get(tp, []):
                    try:
                        self.apply(decode(record.value))
                        self.applied += 1
                    except (ValidationError, ValueError) as err:
                        log.warning("control_message_invalid", offset=record.offset, error=str(err)[:200])
                if not self.caught_up.is_set() and hw is not None and await consumer.position(tp) >= hw:
                    self.caught_up.set()
                    log.info("control_caught_up", messages=self.applied)
        finally:
            await self._stop(consumer)

    async def _stop(self, consumer: AIOKafkaConsumer) -> None:
        """Stop `consumer`, waiting a bounded time: stopping one whose broker went away can hang on a fetch
        that is never answered, and the fresh consumer must not wait for it (it finishes in the background)."""
        stopping = asyncio.ensure_future(consumer.stop())
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        done, _ = await asyncio.wait({stopping}, timeout=STOP_WAIT_S)
        if not done:
            log.warning("control_consumer_stop_slow", wait_s=STOP_WAIT_S)

    def _watch_links(self, consumer: AIOKafkaConsumer) -> None:
        """Note when a broker connection is lost. aiokafka reconnects on its own and keeps the position, which
        after a restart of a memory-only broker points into a log that no longer exists (tansu answers a fetch
        past the end with nothing, not OffsetOutOfRange). aiokafka reads the client's `_on_connection_closed`
        each time it opens a connection, so wrapping it sees every one."""
        client: Any = consumer._client
        inner = client._on_connection_closed

        def closed(conn: Any, reason: Any) -> None:
            if reason in _LOST:
                self._link_lost = True
            inner(conn, reason)

        client._on_connection_closed = closed
