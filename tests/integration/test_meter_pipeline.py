"""Events produced to the real broker land priced, once, in the real ClickHouse engine."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.config import load_config
from schemas.events import DLQ_TOPIC, USAGE_TOPIC
from services.meter.consumer import run_meter
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.waiting import eventually

CONFIG = load_config("tollway.yaml")


async def produce(bootstrap: str, values: list[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futs = [await producer.send(USAGE_TOPIC, value, key=key) for key, value in values]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


@pytest.fixture
async def meter(bootstrap, store, unique):
    stop = asyncio.Event()
    started = asyncio.Event()
    settings = MeterSettings(meter_group=f"test-meter-{unique}", batch_max_wait_ms=50)
    task = asyncio.create_task(run_meter(settings, CONFIG, store, bootstrap, stop, started))
    await asyncio.wait_for(started.wait(), 20)
    yield task
    stop.set()
    await asyncio.wait_for(task, 30)


async def team_totals(store, team: str) -> tuple[int, int, int, Decimal]:
    rows = await store.query(
        "SELECT count(), sum(prompt_tokens), sum(completion_tokens), sum(cost_total) "
        "FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
        {"t": team},
    )
    return rows[0]


async def test_events_land_priced_in_clickhouse(bootstrap, store, meter, unique):
    team = f"team_{unique}"
    events = [make_event(team, prompt_tokens=1000 + i, completion_tokens=10 * i) for i in range(500)]
    await produce(bootstrap, [(team.encode(), e.to_bytes()) for e in events])

    _count, prompt, completion, cost = await eventually(lambda: team_totals(store, team), lambda r: r[0] == 500)

    assert prompt == sum(1000 + i for i in range(500))
    assert completion == sum(10 * i for i in range(500))
    # gpt-4.1 list price: $2.00 in, $8.00 out per 1M tokens, computed here independently of the meter.
    expected = (Decimal(prompt) * Decimal("2.00") + Decimal(completion) * Decimal("8.00")) / Decimal(1_000_000)
    assert cost == expected
    row = (await store.query_dicts(
        "SELECT price_version, unit_input, unit_output, priced FROM {db}.usage_events FINAL "
        "WHERE team_id = {t:String} LIMIT 1", {"t": team},
    ))[0]  # fmt: skip
    # the date of the entry in force (tollway.yaml's newest gpt-4.1 entry) and a hash of the unit prices
    in_force = max(
        p.effective_from for p in CONFIG.models["gpt-4.1"].prices if p.effective_from <= datetime.now(UTC).date()
    )
    assert row.pop("price_version").startswith(f"gpt-4.1/*@{in_force.isoformat()}#")
    assert row == {"unit_input": Decimal("2"), "unit_output": Decimal("8"), "priced": True}


async def test_redelivered_events_are_billed_once(bootstrap, store, meter, unique):
    team = f"team_{unique}"
    events = [make_event(team, prompt_tokens=7, completion_tokens=3) for _ in range(300)]
    payload = [(team.encode(), e.to_bytes()) for e in events]
    await produce(bootstrap, payload)
    await produce(bootstrap, payload[:200])  # a producer retry storm / replay of the first 200
    await produce(bootstrap, payload[100:])
    # Same key -> same partition -> in order: once the sentinel is stored, every copy before it is too.
    sentinel = make_event(team, prompt_tokens=1, completion_tokens=1)
    await produce(bootstrap, [(team.encode(), sentinel.to_bytes())])

    async def stored():
        rows = await store.query(
            "SELECT count(), countIf(event_id = {s:UUID}) FROM {db}.usage_events WHERE team_id = {t:String}",
            {"t": team, "s": sentinel.event_id},
        )
        return rows[0]

    raw_count, _ = await eventually(stored, lambda r: r[1] == 1)
    assert raw_count >= 301  # the duplicates really were written (or merged away already)...
    count, prompt, completion, _ = await team_totals(store, team)
    assert (count, prompt, completion) == (301, 300 * 7 + 1, 300 * 3 + 1)  # ...and each event counts once


async def test_garbage_goes_to_dlq_with_reason_and_meter_keeps_going(bootstrap, store, meter, unique):
    team = f"team_{unique}"
    bad_json = f"not json {unique}".encode()
    bad_schema = orjson.dumps({"event_id": "nope", "team_id": team, "marker": unique})
    good = make_event(team)
    await produce(bootstrap, [(b"x", bad_json), (b"x", bad_schema), (team.encode(), good.to_bytes())])

    await eventually(lambda: team_totals(store, team), lambda r: r[0] == 1)

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(DLQ_TOPIC, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found: dict[str, dict] = {}

        async def read():
            for rec in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                d = orjson.loads(rec.value)
                if unique.encode() in base64.b64decode(d["value_b64"] or ""):
                    found[d["reason"]] = d
            return found

        await eventually(read, lambda f: len(f) == 2)
    finally:
        await consumer.stop()
    reasons = sorted(found)
    assert any(r.startswith("undecodable") or "Invalid JSON" in r for r in reasons), reasons
    assert any("event_id" in r for r in reasons), reasons
    for d in found.values():
        assert d["topic"] == USAGE_TOPIC and d["offset"] >= 0
