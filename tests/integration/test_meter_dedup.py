"""Insert dedup never mistakes a new event for an old one, and never stores an old one twice.

Real broker processes (fresh tansu brokers: memory storage, so a new broker's log restarts at offset 0) and
the real embedded ClickHouse engine. The meter's insert_deduplication_token once named a batch by its
(topic, partition, offset span): a new log that is shorter than the old one hands new batches the spans of old
ones, and ClickHouse drops them without an error.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from decimal import Decimal
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.config import load_config, parse_config
from schemas.events import DLQ_TOPIC
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import create_topic, meter_task, produce
from tests.support.waiting import eventually
from tollway.broker import BundledBroker, free_port
from tollway.topics import ensure_topics

CONFIG = load_config("tollway.yaml")


def settings(unique: str, topic: str, **over: Any) -> MeterSettings:
    return MeterSettings(meter_group=f"g-{unique}", usage_topic=topic, batch_max_wait_ms=100, rollup_interval_s=0.5,
                         insert_backoff_max_s=0.2, meter_session_timeout_ms=3000, **over)  # fmt: skip


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        return await probe.committed(TopicPartition(topic, 0))
    finally:
        await probe.stop()


async def per_event(store, team: str) -> dict[str, int]:
    rows = await store.query("SELECT toString(event_id), count() FROM {db}.usage_events FINAL "
                             "WHERE team_id = {t:String} GROUP BY event_id", {"t": team})  # fmt: skip
    return dict(rows)


async def meter_pass(store, bootstrap: str, s: MeterSettings, config, end: int) -> None:
    """Run a meter until its group has committed the whole single-partition log (`end` records)."""
    async with meter_task(s, config, store, bootstrap):
        await eventually(lambda: committed(bootstrap, s.meter_group, s.usage_topic), lambda c: c == end,
                         timeout_s=45)  # fmt: skip


async def fresh_broker(tmp_path, name: str, topic: str) -> BundledBroker:
    b = BundledBroker(port=free_port(), log_path=tmp_path / f"{name}.log")
    await asyncio.to_thread(b.start)
    await ensure_topics(b.bootstrap)  # the DLQ topic among them
    await create_topic(b.bootstrap, topic, partitions=1)  # one partition: offsets are exact
    return b


def payload(team: str, events) -> list[tuple[bytes, bytes]]:
    return [(team.encode(), e.to_bytes()) for e in events]


async def test_a_fresh_broker_with_a_shorter_log_has_every_new_event_stored(store, unique, tmp_path):
    topic, team = f"usage-{unique}", f"team_{unique}"
    s = settings(unique, topic)
    old = [make_event(team, proxy_instance="px", proxy_seq=i + 1) for i in range(30)]
    new = [make_event(team, proxy_instance="px", proxy_seq=100 + i, prompt_tokens=7 + i) for i in range(10)]
    broker = await fresh_broker(tmp_path, "old", topic)
    try:
        # The old log: three batches of ten (each produced whole before the meter reads it), offsets 0-29.
        for i in range(3):
            await produce(broker.bootstrap, topic, payload(team, old[i * 10 : (i + 1) * 10]))
            await meter_pass(store, broker.bootstrap, s, CONFIG, (i + 1) * 10)
    finally:
        await asyncio.to_thread(broker.stop)
    assert set(await per_event(store, team)) == {e.event_id for e in old}

    # A fresh broker (restart past the spool's retention): ten different events, offsets 0-9 again.
    broker = await fresh_broker(tmp_path, "new", topic)
    try:
        await produce(broker.bootstrap, topic, payload(team, new))
        await meter_pass(store, broker.bootstrap, s, CONFIG, 10)
    finally:
        await asyncio.to_thread(broker.stop)
    stored = await per_event(store, team)
    missing = [e.proxy_seq for e in new if e.event_id not in stored]
    assert not missing, f"new events never stored: proxy_seq {missing}"
    assert set(stored) == {e.event_id for e in old + new} and set(stored.values()) == {1}


def pricey(price: str):
    """tollway.yaml with one more model priced at `price` USD per 1M input tokens."""
    with open("tollway.yaml") as f:
        raw = yaml.safe_load(f)
    raw = copy.deepcopy(raw)
    raw["models"]["pricey"] = {"routes": [{"provider": "openai"}],
                               "prices": [{"effective_from": "2025-01-01", "input": price, "output": "1"}]}  # fmt: skip
    return parse_config(raw)


async def dlq_values(bootstrap: str) -> list[bytes]:
    """The original bytes of every dead letter on the broker's DLQ topic."""
    c = AIOKafkaConsumer(DLQ_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         enable_auto_commit=False)  # fmt: skip
    await c.start()
    try:
        got = await c.getmany(timeout_ms=3000)
        return [base64.b64decode(orjson.loads(r.value)["value_b64"]) for part in got.values() for r in part]
    finally:
        await c.stop()


async def test_a_refed_dead_letter_is_stored_once_and_dead_lettered_once(store, unique, tmp_path):
    topic, team = f"usage-{unique}", f"team_{unique}"
    s = settings(unique, topic)
    bad_price, fixed = pricey("100000000000000000000000000"), pricey("3")  # a mistyped price, then the fix
    good = [make_event(team, proxy_seq=1), make_event(team, proxy_seq=2)]
    dead = make_event(team, proxy_seq=3, served_model="pricey", requested_model="pricey", prompt_tokens=1000,
                      completion_tokens=0)  # fmt: skip

    async def dead_letters() -> list[tuple]:
        return await store.query("SELECT event_id, count() FROM {db}.usage_dead_letters FINAL "
                                 "WHERE team_id = {t:String} GROUP BY event_id", {"t": team})  # fmt: skip

    broker = await fresh_broker(tmp_path, "old", topic)
    try:
        for i, e in enumerate([*good, dead]):  # one batch each: offsets 0, 1 and 2
            await produce(broker.bootstrap, topic, payload(team, [e]))
            await meter_pass(store, broker.bootstrap, s, bad_price, i + 1)
        (refeed,) = await dlq_values(broker.bootstrap)
    finally:
        await asyncio.to_thread(broker.stop)
    assert await dead_letters() == [(dead.event_id, 1)] and refeed == dead.to_bytes()

    broker = await fresh_broker(tmp_path, "new", topic)
    try:
        # The operator re-feeds it before fixing the price: dead-lettered again, still one dead letter.
        await produce(broker.bootstrap, topic, [(team.encode(), refeed)])
        await meter_pass(store, broker.bootstrap, s, bad_price, 1)
        assert await dead_letters() == [(dead.event_id, 1)]
        # Price fixed, re-fed (offset 1, the offset of an old stored batch), and by mistake re-fed once more.
        await produce(broker.bootstrap, topic, [(team.encode(), refeed)])
        await meter_pass(store, broker.bootstrap, s, fixed, 2)
        assert dead.event_id in await per_event(store, team), "the re-fed event was never stored"
        await produce(broker.bootstrap, topic, [(team.encode(), refeed)])
        await meter_pass(store, broker.bootstrap, s, fixed, 3)
    finally:
        await asyncio.to_thread(broker.stop)
    stored = await per_event(store, team)
    assert stored == {good[0].event_id: 1, good[1].event_id: 1, dead.event_id: 1}, stored
    ((cost,),) = await store.query("SELECT cost_total FROM {db}.usage_events FINAL WHERE event_id = {e:UUID}",
                                   {"e": dead.event_id})  # fmt: skip
    assert cost == Decimal("0.003")  # 1000 input tokens at 3 USD per 1M


async def test_a_second_meter_group_on_the_same_topic_counts_nothing_twice(store, bootstrap, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=1)
    events = [make_event(team, proxy_seq=i + 1, prompt_tokens=100 + i) for i in range(300)]
    await produce(bootstrap, topic, payload(team, events))
    first, second = settings(unique, topic, batch_max_rows=70), settings(f"{unique}-2", topic, batch_max_rows=110)
    async with meter_task(first, CONFIG, store, bootstrap), meter_task(second, CONFIG, store, bootstrap):
        for g in (first, second):
            await eventually(lambda g=g: committed(bootstrap, g.meter_group, topic), lambda c: c == 300,
                             timeout_s=45)  # fmt: skip
    stored = await per_event(store, team)
    assert set(stored) == {e.event_id for e in events} and set(stored.values()) == {1}
    ((total, n),) = await store.query("SELECT sum(cost_total), count() FROM {db}.usage_events FINAL "
                                      "WHERE team_id = {t:String}", {"t": team})  # fmt: skip
    expected = sum(Decimal(100 + i) * 2 + 50 * 8 for i in range(300)) / 1_000_000
    assert (total, n) == (expected, 300)


class AcceptedThenTimeout:
    """A Store whose first usage_events insert reaches ClickHouse, is accepted, and then raises a timeout:
    the reply was lost, as the meter sees it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.timeouts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _then_lose_the_reply(self, table: str) -> None:
        if table == "usage_events" and self.timeouts == 0:
            self.timeouts += 1
            raise TimeoutError("injected: the insert was accepted, the reply timed out")

    async def insert_raw(self, table: str, *a: Any, **kw: Any) -> None:
        await self._inner.insert_raw(table, *a, **kw)
        await self._then_lose_the_reply(table)

    async def insert_columns(self, table: str, *a: Any, **kw: Any) -> None:
        await self._inner.insert_columns(table, *a, **kw)
        await self._then_lose_the_reply(table)


async def test_an_insert_accepted_then_timed_out_is_retried_into_exactly_one_copy(store, bootstrap, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=1)
    events = [make_event(team, proxy_seq=i + 1) for i in range(200)]
    await produce(bootstrap, topic, payload(team, events))
    s = settings(unique, topic)
    flaky = AcceptedThenTimeout(store)
    async with meter_task(s, CONFIG, flaky, bootstrap):
        await eventually(lambda: committed(bootstrap, s.meter_group, topic), lambda c: c == 200, timeout_s=45)
    assert flaky.timeouts == 1
    ((raw,),) = await store.query("SELECT count() FROM {db}.usage_events WHERE team_id = {t:String}", {"t": team})
    stored = await per_event(store, team)
    assert set(stored) == {e.event_id for e in events} and set(stored.values()) == {1}
    assert raw == 200  # the retry of the accepted insert was dropped by its token, not merely collapsed by FINAL
