"""Usage events out of the request path, through the on-disk spool.

The handler calls `emit()` with the call's UsageDraft: it stamps the instance sequence number, serializes
the draft (every UsageEvent v1 field, in the model's order: the canonical form, as `model_dump_json` writes
it) and appends that to the spool with its Kafka key, the team (one write, no network) -- so an answered
call is on disk before its response leaves. A background sender reads the spool in order and hands key and
bytes as they are to a lingering, compressing producer; the spool cursor advances only when the broker
acknowledges. The full
contract check is the meter's (a malformed event becomes a dead letter with its reason, never a silent
drop); tests/unit/test_proxy_emit.py holds emit's bytes equal to the model's. If the broker is down or slow the
proxy keeps serving and the spool grows; when it is back the sender catches up in order.

proxy_seq is persisted (sequence file, and recovered from the spool's last record), so a restarted proxy
continues where it left off and a gap downstream means a lost event.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaProducer

from schemas.events import USAGE_TOPIC
from services.proxy import metrics
from services.proxy.draft import UsageDraft
from services.proxy.spool import SPOOL_REPLAYED, Pos, Spool, SpoolSettings, fsync_all

log = structlog.get_logger("tollway.proxy.events")


_DUMP_OPTS = orjson.OPT_UTC_Z  # "...Z", as pydantic writes a UTC datetime
MAX_KEY_BYTES = 0xFFFF  # what a spool record's key length holds


def canonical_event(draft: UsageDraft) -> bytes:
    """The usage event's bytes in the contract's canonical form (what `UsageEvent.model_dump_json` gives):
    orjson writes a dataclass's fields in their declared order, which is the model's."""
    return orjson.dumps(draft, default=str, option=_DUMP_OPTS)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _team_of(payload: bytes) -> bytes | None:
    """The key of a record spooled before records carried it (an older proxy's spool, replayed after an upgrade)."""
    try:
        team = orjson.loads(payload).get("team_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return team.encode() if isinstance(team, str) and team else None


class SequenceFile:
    """The last proxy_seq handed out, in an 8-byte file; a write is one pwrite, no fsync.

    kill -9 keeps the page cache; after a machine crash the spool's last record restores it.
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
    def __init__(self, bootstrap: str, instance: str, seq_path: Path, linger_ms: int = 10, queue_max: int = 100_000,
                 spool: SpoolSettings | None = None, replay_retained: bool = False, topic: str = USAGE_TOPIC):  # fmt: skip
        self.bootstrap = bootstrap
        self.instance = instance
        self.topic = topic
        self.seq = SequenceFile(seq_path)
        self.linger_ms = linger_ms
        self.window = max(1000, min(queue_max, 50_000))  # unacknowledged sends in flight at most
        self.spool = Spool(seq_path.parent / "spool" / seq_path.stem, spool)
        if self.spool.last_payload:  # the payload is the event in either record format
            try:  # the spool outlives a stale sequence file (machine crash): never hand out a number twice
                self.seq.value = max(self.seq.value, int(orjson.loads(self.spool.last_payload)["proxy_seq"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
        # A fresh in-memory broker (bundled, just (re)started) lost whatever it held: send the retained window.
        self._send_from: Pos = self.spool.replay_start() if replay_retained else self.spool.acked
        self._replay_until: Pos = self.spool.acked
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = False
        self.started = asyncio.Event()
        self.sent = 0
        self.refused = 0
        self._last_refused_log = 0.0

    def emit(self, draft: UsageDraft) -> None:
        """Called on the request path: stamp, serialize, one write to the spool. Never blocks on the network."""
        draft.proxy_instance = self.instance
        draft.proxy_seq = self.seq.next()
        # keyed by team: one team's events stay in order on one partition (an empty key: refused when sent)
        key = draft.team_id.encode()[:MAX_KEY_BYTES] if draft.team_id else b""
        try:
            ok = self.spool.append(canonical_event(draft), key)
        except OSError as err:  # disk full / gone: keep serving, say so loudly
            ok = False
            log.error("spool_write_failed", error=str(err)[:200])
        if not ok:
            self.refused += 1
            metrics.EVENTS.labels("dropped_spool_full").inc()
            if time.monotonic() - self._last_refused_log > 1.0:
                self._last_refused_log = time.monotonic()
                log.error("usage_event_refused_spool_full", refused=self.refused, **self.spool.stats())
        self._wake.set()

    @property
    def queued(self) -> int:
        return self.spool.pending_events

    def replay_retained(self) -> None:
        """The broker was replaced by an empty one: re-send everything still retained (dedup absorbs repeats)."""
        self._send_from = self.spool.replay_start()
        self._replay_until = self.spool.acked
        if self._task is not None:
            self._task.cancel()
            self._task = asyncio.create_task(self._run(), name="usage-emitter")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-emitter")
        # Serving does not wait for the broker: the spool takes every event from the first request on.
        self.started.set()

    def _producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=self.linger_ms,
                                compression_type="lz4", max_batch_size=1024 * 1024, request_timeout_ms=10_000,
                                metadata_max_age_ms=5_000)  # fmt: skip

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            producer = self._producer()
            try:
                await producer.start()
                self.connected = True
                attempt = 0
                await self._pump(producer)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                attempt += 1
                delay = min(5.0, 0.2 * 2**attempt)
                # Resend from the last acknowledged record: in order, and repeats are absorbed by event_id.
                self._send_from = min(self._send_from, self.spool.acked)
                log.warning("usage_producer_failed", error=str(err)[:200], attempt=attempt, retry_in_s=delay,
                            **self.spool.stats())  # fmt: skip
                await self._housekeep_for(delay)
            finally:
                self.connected = False
                await asyncio.shield(producer.stop())

    async def _housekeep_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._closing:
            await self._sync()
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    async def _sync(self) -> None:
        fds = self.spool.begin_sync()
        if fds is not None:
            await asyncio.to_thread(fsync_all, fds)  # an fsync takes ms: never on the event loop
            self.spool.end_sync()
        self.seq.persist()
        metrics.EVENTS_QUEUED.set(self.spool.pending_events)

    async def _pump(self, producer: AIOKafkaProducer) -> None:
        inflight: deque[tuple[Pos, asyncio.Future[Any] | None]] = deque()
        events_sent = metrics.EVENTS.labels("sent")
        pos = self._send_from
        while True:
            self._wake.clear()
            records = self.spool.read(pos, 2_000) if len(inflight) < self.window else []
            for key, payload, nxt in records:
                fut = None
                team = _team_of(payload) if key is None else (key or None)  # None: an older proxy's record
                if team is None:  # a proxy bug, not a caller's: say so loudly, keep serving
                    metrics.EVENTS.labels("invalid").inc()
                    log.error("usage_event_invalid", error="no team_id to key the event by",
                              payload=payload[:300].decode("utf-8", "replace"))  # fmt: skip
                else:
                    # the spooled bytes are the event (canonical since emit), with the key emit gave them
                    fut = await producer.send(self.topic, payload, key=team)
                    fut.add_done_callback(_retrieve)  # after a rewind nobody awaits the rest: keep asyncio quiet
                    if nxt <= self._replay_until:
                        SPOOL_REPLAYED.inc()
                inflight.append((nxt, fut))
                pos = self._send_from = nxt
            acked = sent = 0
            while inflight and (inflight[0][1] is None or inflight[0][1].done()):
                nxt, fut = inflight.popleft()
                if fut is not None:
                    fut.result()  # a failed delivery raises: the caller rewinds to the cursor
                    self.sent += 1
                    sent += 1
                acked += 1
                last = nxt
            if sent:
                events_sent.inc(sent)  # once per batch, not per event
            if acked:
                self.spool.ack(last, acked)
            await self._sync()
            if records:
                continue
            if inflight:
                head = inflight[0][1]
                assert head is not None
                await asyncio.wait([head], timeout=0.2)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.spool.s.spool_fsync_ms / 1000)
                except TimeoutError:
                    pass
                if self._closing:
                    return
                if self._wake.is_set():
                    # woken by an event: let the next few ms of events join it, so that one spool read, one
                    # produce batch and one wake-up serve them all (at low rates each event was its own round)
                    await asyncio.sleep(self.linger_ms / 1000)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Give the sender up to `timeout_s` to empty the spool; what is left stays on disk for the next start."""
        deadline = time.monotonic() + timeout_s
        while self.spool.pending_events and self.connected and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        self._closing = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.spool.close()
        self.seq.close()
        log.info("usage_emitter_stopped", sent=self.sent, refused=self.refused, unsent=self.spool.pending_events)
