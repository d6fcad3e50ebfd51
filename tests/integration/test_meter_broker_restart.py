"""The bundled broker restarts under a running meter (memory storage: topics, logs and committed offsets gone) and
the proxy spool refills it. Offsets the meter read from the old log mean nothing in the new one; if one of them is
committed on the new broker, the group resumes there and skips the head of the refilled log. Every event of the new
log must still be billed, once.

How the offset gets there (observed with tansu and aiokafka 0.14): tansu does not know the meter's member any more,
so its next heartbeat or commit fails (UNKNOWN_MEMBER_ID) and aiokafka rejoins. A commit sent while it rejoins goes
out with generation -1, which tansu accepts (Kafka would refuse it); the rejoin then starts the partition at that
committed offset. Here the commit is of a batch read from the OLD broker and still being inserted when the broker
went away.

Deterministic, no timing luck: the batch is parked in its ClickHouse insert (a gate) across the restart, the meter's
consumer is paused (aiokafka's public pause) so it fetches nothing from the new broker before the rejoin, and the
gate is opened from inside the rejoin (a rebalance listener's on_partitions_revoked, which aiokafka awaits before
it sends JoinGroup), after the new broker holds the whole refilled log; the listener returns only once the batch's
commit step is over.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from prometheus_client import REGISTRY

import services.meter.consumer as meter_consumer
from schemas.config import load_config
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import create_topic, meter_task, produce
from tests.support.waiting import eventually
from tollway.broker import BundledBroker, free_port

CONFIG = load_config("tollway.yaml")
OLD, HELD, REPLAYED, NEW = 400, 50, 100, 600  # the new log: the spool's last 100 old events, then 600 new ones


class GatedStore:
    """A Store whose usage_events inserts wait while `gate` is clear: a slow ClickHouse insert, on demand."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()  # set once an insert is parked at the gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _pass(self, table: str) -> None:
        if table == "usage_events" and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()

    async def insert_raw(self, table: str, *a: Any, **kw: Any) -> None:
        await self._pass(table)
        await self._inner.insert_raw(table, *a, **kw)

    async def insert_columns(self, table: str, *a: Any, **kw: Any) -> None:
        await self._pass(table)
        await self._inner.insert_columns(table, *a, **kw)

    async def insert_rows(self, table: str, *a: Any, **kw: Any) -> None:
        await self._pass(table)
        await self._inner.insert_rows(table, *a, **kw)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class DuringRejoin(ConsumerRebalanceListener):
    """Runs `hook` once, inside the first rejoin after it is set, before aiokafka sends JoinGroup."""

    def __init__(self) -> None:
        self.hook: Any = None
        self.ran = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.hook is not None and not self.ran.is_set():
            await self.hook()
            self.ran.set()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        pass


async def committed(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        return await probe.committed(tp)
    finally:
        await probe.stop()


async def test_a_batch_read_before_a_broker_restart_never_moves_the_refilled_log_past_unbilled_events(
    store, unique, tmp_path, monkeypatch
):
    topic, team, group = f"usage-{unique}", f"team_{unique}", f"g-{unique}"
    tp = TopicPartition(topic, 0)
    consumers: list[AIOKafkaConsumer] = []
    rejoin = DuringRejoin()

    class Recorded(AIOKafkaConsumer):  # the meter's own consumer: to pause it and to see its rejoin
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.subscribe([topic], listener=rejoin)
            consumers.append(self)

    monkeypatch.setattr(meter_consumer, "AIOKafkaConsumer", Recorded)
    events = [make_event(team, proxy_instance=f"px-{unique}", proxy_seq=i + 1) for i in range(OLD + HELD + NEW)]
    old, new = events[: OLD + HELD], events[OLD + HELD :]
    settings = MeterSettings(meter_group=group, usage_topic=topic, batch_max_wait_ms=50, batch_max_rows=2_000,
                             rollup_interval_s=0.5, insert_backoff_max_s=0.5, meter_session_timeout_ms=3000)  # fmt: skip
    gated = GatedStore(store)
    rewound = sample("tollway_meter_positions_rewound_total", reason="broker_behind")

    def payload(evs):
        return [(team.encode(), e.to_bytes()) for e in evs]

    async def stored() -> dict[str, int]:
        rows = await store.query("SELECT toString(event_id), count() FROM {db}.usage_events FINAL "
                                 "WHERE team_id = {t:String} GROUP BY event_id", {"t": team})  # fmt: skip
        return dict(rows)

    broker = BundledBroker(port=free_port(), log_path=tmp_path / "tansu.log")
    await asyncio.to_thread(broker.start)
    try:
        await create_topic(broker.bootstrap, topic, partitions=1)  # one partition: the offsets are exact
        async with meter_task(settings, CONFIG, gated, broker.bootstrap):
            (meter,) = consumers
            assert await produce(broker.bootstrap, topic, payload(old[:OLD])) == {0: OLD}
            await eventually(stored, lambda s: len(s) == OLD, timeout_s=30)
            await eventually(lambda: committed(broker.bootstrap, group, tp), lambda c: c == OLD, timeout_s=30)

            # A batch (offsets 400-449 of the old log) is read and its insert is still running when the broker dies.
            gated.gate.clear()
            await produce(broker.bootstrap, topic, payload(old[OLD:]))
            await asyncio.wait_for(gated.waiting.wait(), 30)
            meter.pause(tp)  # nothing is fetched from the new broker before the rejoin
            await asyncio.to_thread(broker.kill)

            refilled = asyncio.Event()

            async def finish_the_held_batch() -> None:
                await refilled.wait()
                written = sample("tollway_meter_events_total", outcome="written")
                gated.gate.set()  # the insert completes; then the meter commits (or refuses to)
                await eventually(lambda: _v(sample("tollway_meter_events_total", outcome="written")),
                                 lambda n: n >= written + HELD, timeout_s=30)  # fmt: skip

            rejoin.hook = finish_the_held_batch
            # Same port, empty; the spool replays its retained window (the last old events) and the new ones.
            await asyncio.to_thread(broker.start)
            await create_topic(broker.bootstrap, topic, partitions=1)
            ends = await produce(broker.bootstrap, topic, payload(old[-REPLAYED:]) + payload(new))
            assert ends == {0: REPLAYED + NEW} and REPLAYED + NEW > OLD + HELD  # the new log is past the old offsets
            refilled.set()
            await asyncio.wait_for(rejoin.ran.wait(), 30)  # tansu does not know the old member: it must rejoin

            # Right or wrong, the meter ends with the whole new log committed (a batch is inserted before its
            # commit, and nothing is left to fetch after it): what ClickHouse holds then is what gets billed.
            await eventually(lambda: committed(broker.bootstrap, group, tp), lambda c: c == REPLAYED + NEW,
                             timeout_s=60)  # fmt: skip
            counts = await stored()
        missing = sorted(e.proxy_seq for e in events if e.event_id not in counts)
        assert not missing, f"{len(missing)} events never billed: proxy_seq {missing[0]}..{missing[-1]}"
        assert set(counts) == {e.event_id for e in events} and set(counts.values()) == {1}
        assert sample("tollway_meter_positions_rewound_total", reason="broker_behind") > rewound  # the guard did it
    finally:
        await asyncio.to_thread(broker.stop)


async def _v(x):
    return x
