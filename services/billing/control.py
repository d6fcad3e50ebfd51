"""Publishes account state to the control topic, which every proxy folds into its in-memory view.

Control messages are rare and each one matters (a revoked key must stop working), so none is fired and
forgotten: every message goes into an outbox, and one sender task publishes the outbox in order, waiting
for the broker's acknowledgement, retrying with backoff until it lands. A caller waits a bounded time for
its message and learns whether it landed; one that did not is still published once the broker is back.

The outbox is in memory, not a table, on purpose: every message is derived from durable state (teams and
keys in ClickHouse, quota totals seeded from usage rows), and each start republishes the full state, so a
crash loses nothing an outbox table would have kept. Per entity only the latest state is kept (the proxy
folds latest-wins), which bounds the outbox by the number of entities however long the broker is away.
After an outage, and whenever an ack shows the log shorter than before, the full state is republished too:
the bundled broker keeps memory only, so a broker that came back may have come back empty.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaProducer

from schemas.budgets import Budget
from schemas.control import CONTROL_TOPIC, KeyState, QuotaSignal, Snapshot, TeamState, encode, message_key
from services.billing import metrics
from services.billing.producers import started_producer

if TYPE_CHECKING:
    from services.billing.accounts import Accounts

log = structlog.get_logger("tollway.billing")

ControlMsg = TeamState | KeyState | QuotaSignal | Snapshot | Budget
# What a full-state republish needs, asked for when it happens (the quota states change all the time).
FullState = Callable[[], tuple["Accounts", list[QuotaSignal | Budget], Callable[[KeyState], KeyState] | None]]

RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
# When a usage update replaces a pending one its event ids are carried over, up to this many (the newest;
# ~80 KB): a message must stay far below the broker's size limit. A proxy forgets ids older than its ack
# horizon (30 s) anyway, so after a long outage the oldest ones no longer matter.
MAX_COUNTED_IDS = 2000


@dataclass(eq=False)
class _Entry:
    msg: ControlMsg
    key: bytes
    value: bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)
    absorbed: list[_Entry] = field(default_factory=list)  # older states of the same entity this one replaced

    def delivered(self) -> None:
        for e in (self, *self.absorbed):
            e.done.set()


class ControlPublisher:
    def __init__(self, bootstrap: str, topic: str = CONTROL_TOPIC, wait_s: float = 2.0,
                 prepare: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        """`prepare`: run once before the first connection (e.g. create the topics) and retried with it."""
        self._bootstrap = bootstrap
        self._prepare = prepare
        self._topic = topic
        self._wait_s = wait_s
        self._producer: AIOKafkaProducer | None = None
        self._pending: OrderedDict[bytes, _Entry] = OrderedDict()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._failing = False
        self._down = asyncio.Event()  # set while the broker is known to be away (wakes a waiting full state)
        self._last_offset = -1
        self._reset_seen = False
        self.full_state: FullState | None = None  # set by the app once accounts and quota exist

    async def start(self) -> None:
        """Start the sender. The broker need not be up: the sender connects when it has something to send and
        keeps retrying, so billing starts, serves reads and saves admin writes through a broker outage."""
        self._sender = asyncio.create_task(self._send_loop(), name="billing-control-outbox")

    @property
    def connected(self) -> bool:
        return self._producer is not None and not self._failing

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        if self._prepare is not None:
            await self._prepare()
            self._prepare = None
        producer = await started_producer(self._bootstrap, client_id="tollway-billing")
        self._producer = producer
        return producer

    async def stop(self, flush_s: float = 5.0) -> None:
        if self._sender is not None:
            # A last chance for what is still pending; the next start republishes everything anyway.
            if self._pending and not self._failing:
                await self._drained(flush_s)
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._pending:
            log.warning("control_outbox_dropped_at_stop", pending=len(self._pending))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish(self, msg: ControlMsg, wait_s: float | None = None) -> bool:
        """Queue `msg` and wait (bounded) for the broker's ack. True: it landed. False: it is still queued
        and will be published when the broker takes it (answered at once while the broker is known away)."""
        entry = self._put(msg)
        if self._failing:  # the broker is away: queued, and waiting would only stall the caller (the quota loop)
            return False
        try:
            await asyncio.wait_for(entry.done.wait(), self._wait_s if wait_s is None else wait_s)
        except TimeoutError:
            return False
        log.debug("control_published", kind=msg.kind, key=entry.key.decode())
        return True

    async def publish_full_state(
        self,
        accounts: Accounts,
        quota: list[QuotaSignal | Budget] | None = None,
        key_state: Callable[[KeyState], KeyState] | None = None,
        wait_s: float | None = None,
    ) -> bool:
        """Every team, every key, the current quota states, then a Snapshot: a proxy that sees the Snapshot
        holds the whole view. A message that cannot be encoded is logged, counted and left out: one bad
        stored row must never stop billing from starting."""
        entry = self._queue_full_state(accounts, quota or [], key_state)
        # Wait for the ack, or until the broker is known to be away: the outbox then sends it when it is back.
        waits = [asyncio.ensure_future(entry.done.wait()), asyncio.ensure_future(self._down.wait())]
        try:
            await asyncio.wait(waits, timeout=30.0 if wait_s is None else wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not entry.done.is_set():
            log.warning("control_full_state_pending", pending=len(self._pending), broker_away=self._failing)
            return False
        assert isinstance(entry.msg, Snapshot)
        log.info("control_full_state_published", teams=entry.msg.teams, keys=entry.msg.keys,
                 quota_states=entry.msg.quota_states)  # fmt: skip
        return True

    # -- the outbox ------------------------------------------------------------------------------------

    def _put(self, msg: ControlMsg) -> _Entry:
        key = message_key(msg)
        old = self._pending.pop(key, None)
        if old is not None and isinstance(msg, QuotaSignal) and isinstance(old.msg, QuotaSignal) and old.msg.counted:
            # The proxy drops these ids from its local ledger: a replaced update must not lose them.
            msg = msg.model_copy(update={"counted": [*old.msg.counted, *msg.counted][-MAX_COUNTED_IDS:]})
        entry = _Entry(msg=msg, key=key, value=encode(msg))
        if old is not None:
            entry.absorbed = [old, *old.absorbed]
        self._pending[key] = entry  # at the end: the newest state goes after everything queued before it
        metrics.CONTROL_OUTBOX.set(len(self._pending))
        self._wake.set()
        return entry

    async def _drained(self, timeout_s: float) -> None:
        last = next(reversed(self._pending.values()))
        try:
            await asyncio.wait_for(last.done.wait(), timeout_s)
        except TimeoutError:
            pass

    async def _send_loop(self) -> None:
        backoff = RETRY_MIN_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._send_batch(list(self._pending.values()))
                except Exception as err:  # broker away or slow: keep everything, try again
                    metrics.CONTROL_PUBLISH_FAILURES.inc()
                    if not self._failing:
                        log.warning("control_publish_failed", pending=len(self._pending), error=type(err).__name__,
                                    detail=str(err)[:200])  # fmt: skip
                    self._failing = True
                    self._down.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                backoff = RETRY_MIN_S
                if self._failing or self._reset_seen:
                    log.info("control_publish_recovered", pending=len(self._pending), log_reset=self._reset_seen)
                    self._failing = self._reset_seen = False
                    self._down.clear()
                    self._republish_after_outage()

    async def _send_batch(self, batch: list[_Entry]) -> None:
        """Send in order; a Snapshot goes only after everything queued before it has been acknowledged, so a
        Snapshot never follows state that failed to land."""
        producer = await self._connect()
        inflight: list[tuple[_Entry, asyncio.Future[object]]] = []
        sent: list[asyncio.Future[object]] = []
        try:
            for entry in batch:
                if isinstance(entry.msg, Snapshot) and inflight:
                    await self._settle(inflight)
                    inflight = []
                fut = await producer.send(self._topic, value=entry.value, key=entry.key)
                sent.append(fut)
                inflight.append((entry, fut))
                if isinstance(entry.msg, Snapshot):
                    await self._settle(inflight)
                    inflight = []
            await self._settle(inflight)
        except BaseException:
            for fut in sent:  # the batch is retried whole: these outcomes no longer matter
                fut.add_done_callback(_ignore_outcome)
            raise

    async def _settle(self, inflight: list[tuple[_Entry, asyncio.Future[object]]]) -> None:
        # One partition, one producer: the broker acks in order, so waiting in order loses nothing.
        for entry, fut in inflight:
            meta = await asyncio.wait_for(fut, 15.0)
            offset = getattr(meta, "offset", None)
            if offset is not None:
                if offset < self._last_offset:
                    # The log is shorter than it was: a broker that restarted empty (the bundled one keeps
                    # memory only), and aiokafka's own retries delivered into it. Everything published
                    # before is gone from it, so a proxy starting now needs the full state again.
                    log.warning("control_log_reset", offset=offset, previous=self._last_offset)
                    self._reset_seen = True
                self._last_offset = offset
            if self._pending.get(entry.key) is entry:
                del self._pending[entry.key]
            metrics.CONTROL_MESSAGES.labels(kind=entry.msg.kind).inc()
            metrics.CONTROL_OUTBOX.set(len(self._pending))
            entry.delivered()

    def _queue_full_state(
        self, accounts: Accounts, quota: list[QuotaSignal | Budget], key_state: Callable[[KeyState], KeyState] | None
    ) -> _Entry:
        teams = accounts.teams()
        keys = [key_state(k) for k in accounts.keys()] if key_state else accounts.keys()
        for msg in [*teams, *keys, *quota]:
            try:
                self._put(msg)
            except (TypeError, ValueError) as err:  # orjson refuses e.g. an int beyond 64 bits
                metrics.CONTROL_UNENCODABLE.labels(kind=msg.kind).inc()
                log.error("control_message_unencodable", kind=msg.kind, key=message_key(msg).decode(),
                          error=str(err)[:200])  # fmt: skip
        return self._put(Snapshot(published_at=datetime.now(UTC), keys=len(keys), teams=len(teams),
                                  quota_states=len(quota)))  # fmt: skip

    def _republish_after_outage(self) -> None:
        if self.full_state is None:
            return
        entry = self._queue_full_state(*self.full_state())
        assert isinstance(entry.msg, Snapshot)
        log.info("control_full_state_requeued", teams=entry.msg.teams, keys=entry.msg.keys)


def _ignore_outcome(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()
