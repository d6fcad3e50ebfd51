"""Publishes account state to the control topic, which every proxy folds into its in-memory view.

Control messages are rare and each one matters (a revoked key must stop working), so every publish
waits for the broker's acknowledgement instead of firing and forgetting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaProducer

from schemas.control import CONTROL_TOPIC, KeyState, QuotaSignal, Snapshot, TeamState, encode, message_key
from services.billing import metrics

if TYPE_CHECKING:
    from services.billing.accounts import Accounts

log = structlog.get_logger("tollway.billing")

ControlMsg = TeamState | KeyState | QuotaSignal | Snapshot


class ControlPublisher:
    def __init__(self, bootstrap: str, topic: str = CONTROL_TOPIC) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id="tollway-billing",
            acks="all",
            linger_ms=5,
        )
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()  # flushes anything still in flight
            self._producer = None

    async def publish(self, msg: ControlMsg) -> None:
        """Returns once the broker has the message."""
        await self._send(msg)
        log.debug("control_published", kind=msg.kind, key=message_key(msg).decode())

    async def publish_full_state(
        self,
        accounts: Accounts,
        quota: list[QuotaSignal] | None = None,
        key_state: Callable[[KeyState], KeyState] | None = None,
    ) -> int:
        """Every team, every key, the current quota states, then a Snapshot: a proxy that sees the Snapshot
        holds the whole view."""
        teams = accounts.teams()
        keys = [key_state(k) for k in accounts.keys()] if key_state else accounts.keys()
        quota = quota or []
        # Enqueue in order (one partition, one producer: enqueue order is log order), then wait for every
        # ack before the Snapshot, so a Snapshot never follows state that failed to land.
        pending = [(msg, await self._enqueue(msg)) for msg in [*teams, *keys, *quota]]
        for msg, delivered in pending:
            await delivered
            metrics.CONTROL_MESSAGES.labels(kind=msg.kind).inc()
        await self._send(
            Snapshot(published_at=datetime.now(UTC), keys=len(keys), teams=len(teams), quota_states=len(quota))
        )
        log.info("control_full_state_published", teams=len(teams), keys=len(keys), quota_states=len(quota))
        return len(teams) + len(keys) + len(quota) + 1

    async def _enqueue(self, msg: ControlMsg) -> asyncio.Future[object]:
        if self._producer is None:
            raise RuntimeError("ControlPublisher is not started")
        return await self._producer.send(self._topic, value=encode(msg), key=message_key(msg))

    async def _send(self, msg: ControlMsg) -> None:
        await (await self._enqueue(msg))
        metrics.CONTROL_MESSAGES.labels(kind=msg.kind).inc()
