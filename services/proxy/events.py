"""Usage events out of the request path: the handler appends a dict; a background task stamps the
instance sequence number, validates, serializes and hands batches to a lingering, compressing producer.

Nothing here is awaited by a request. The sequence number is persisted after every drained batch, so a
restarted proxy continues where it left off and a gap downstream means a lost event.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from schemas.events import USAGE_TOPIC, UsageEvent
from services.proxy import metrics

log = structlog.get_logger("tollway.proxy.events")


class SequenceFile:
    """The last proxy_seq handed out, in an 8-byte file; a write is one pwrite, no fsync.

    kill -9 keeps the page cache, so only a machine crash could rewind it (by at most one batch).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self._fd, 8, 0)
        self.value = int.from_bytes(raw, "big") if len(raw) == 8 else 0

    def next(self) -> int:
        self.value += 1
        return self.value

    def persist(self) -> None:
        os.pwrite(self._fd, self.value.to_bytes(8, "big"), 0)

    def close(self) -> None:
        self.persist()
        os.close(self._fd)


class UsageEmitter:
    def __init__(self, bootstrap: str, instance: str, seq_path: Path, linger_ms: int = 10, queue_max: int = 100_000):
        self.bootstrap = bootstrap
        self.instance = instance
        self.seq = SequenceFile(seq_path)
        self.linger_ms = linger_ms
        self.queue_max = queue_max
        self._pending: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self.started = asyncio.Event()
        self.sent = 0
        self.failed = 0

    def emit(self, fields: dict[str, Any]) -> None:
        """Called on the request path: O(1), never blocks, never raises for a full queue (it counts)."""
        if len(self._pending) >= self.queue_max:
            metrics.EVENTS.labels("dropped_queue_full").inc()
            log.error("usage_queue_full", queue_max=self.queue_max, team_id=fields.get("team_id"))
            return
        self._pending.append(fields)
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-emitter")

    async def _connect(self) -> AIOKafkaProducer:
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=self.linger_ms,
                compression_type="lz4",
                max_batch_size=1024 * 1024,
            )
            try:
                await producer.start()
                return producer
            except Exception as err:
                log.warning("usage_producer_connect_failed", error=str(err)[:200])
                await producer.stop()
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        self._producer = await self._connect()
        self.started.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        assert self._producer is not None
        while self._pending:
            fields = self._pending.popleft()
            fields["proxy_instance"] = self.instance
            fields["proxy_seq"] = self.seq.next()
            try:
                event = UsageEvent(**fields)
            except ValidationError as err:  # a proxy bug, not a caller's: say so loudly, keep serving
                metrics.EVENTS.labels("invalid").inc()
                log.error("usage_event_invalid", error=str(err)[:500], request_id=fields.get("request_id"))
                continue
            fut = await self._producer.send(USAGE_TOPIC, event.to_bytes(), key=event.team_id.encode())
            self._inflight.add(fut)
            fut.add_done_callback(self._delivered)
        self.seq.persist()

    def _delivered(self, fut: asyncio.Future[Any]) -> None:
        self._inflight.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            metrics.EVENTS.labels("failed").inc()
            log.error(
                "usage_event_send_failed", error=str(fut.exception())[:200] if not fut.cancelled() else "cancelled"
            )
        else:
            self.sent += 1
            metrics.EVENTS.labels("sent").inc()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued and in flight, then close the producer."""
        if self._producer is not None and self.started.is_set():
            await self._drain()
            if self._inflight:
                await asyncio.wait(list(self._inflight), timeout=timeout_s)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
        self.seq.close()
        log.info("usage_emitter_stopped", sent=self.sent, failed=self.failed, unsent=len(self._pending))
