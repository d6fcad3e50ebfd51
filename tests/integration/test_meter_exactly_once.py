"""The meter on the real broker and the real ClickHouse engine: exactly once, lossless, explainable."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.config import load_config, parse_config
from schemas.events import DLQ_TOPIC
from schemas.prices import PriceBook, price
from services.billing.api.reconcile import reconcile_report
from services.meter.rerate import rerate_period
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import FlakyStore, create_topic, meter_task, produce
from tests.support.waiting import eventually

CONFIG = load_config("tollway.yaml")
MILLION = Decimal(1_000_000)
PERIOD = datetime.now(UTC).strftime("%Y-%m")


def settings(unique: str, topic: str, **over) -> MeterSettings:
    return MeterSettings(meter_group=f"g-{unique}", usage_topic=topic, batch_max_wait_ms=50, batch_max_rows=2_000,
                         rollup_interval_s=0.3, insert_backoff_max_s=0.5, meter_session_timeout_ms=3000, **over)  # fmt: skip


async def totals(store, team: str):
    rows = await store.query(
        "SELECT count(), sum(prompt_tokens), sum(completion_tokens), sum(cost_total), countIf(NOT priced) "
        "FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
        {"t": team},
    )
    return rows[0]


def events_for(team: str, n: int, instance: str, **over):
    return [make_event(team, prompt_tokens=100 + i % 7, completion_tokens=10 + i % 5, proxy_instance=instance,
                       proxy_seq=i + 1, **over) for i in range(n)]  # fmt: skip


# An Anthropic Messages call's event: cache reads and both cache writes inside its prompt, web searches
MESSAGES_EVENT = {"endpoint": "messages", "requested_model": "claude-sonnet-4.5", "served_model": "claude-sonnet-4.5",
                  "provider": "anthropic", "cached_tokens": 40, "cache_write_tokens": 20, "cache_write_1h_tokens": 10,
                  "web_search_requests": 1, "service_tier": "standard"}  # fmt: skip


async def dimension_totals(store, team: str):
    rows = await store.query(
        "SELECT sum(cached_tokens), sum(cache_write_tokens), sum(cache_write_1h_tokens), sum(web_search_requests) "
        "FROM {db}.usage_events FINAL WHERE team_id = {t:String}",
        {"t": team},
    )
    return rows[0]


@pytest.mark.parametrize("shape", ["chat", "messages"])
async def test_replays_and_duplicates_of_thousands_leave_totals_and_rollups_unchanged(bootstrap, store, unique, shape):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    events = events_for(team, 3_000, f"px-{unique}", **(MESSAGES_EVENT if shape == "messages" else {}))
    payload = [(team.encode(), e.to_bytes()) for e in events]
    prompt = sum(e.prompt_tokens for e in events)
    completion = sum(e.completion_tokens for e in events)
    book = PriceBook(CONFIG)
    cost = sum((price(e, book).cost.total for e in events), Decimal(0))  # each event priced once
    if shape == "chat":
        assert cost == (prompt * Decimal("2.00") + completion * Decimal("8.00")) / MILLION
    async with meter_task(settings(unique, topic), CONFIG, store, bootstrap):
        await produce(bootstrap, topic, payload)
        await produce(bootstrap, topic, payload[:2_000])  # a replay
        await produce(bootstrap, topic, payload[500:])  # and another, overlapping
        await produce(bootstrap, topic, payload)  # and the whole thing again
        # One key -> one partition, in order: once the sentinel is stored, every copy before it was too.
        sentinel = make_event(f"{team}-sentinel")
        await produce(bootstrap, topic, [(team.encode(), sentinel.to_bytes())])
        await eventually(lambda: totals(store, f"{team}-sentinel"), lambda r: r[0] == 1, timeout_s=60)
        raw = await store.query("SELECT count() FROM {db}.usage_events WHERE team_id = {t:String}", {"t": team})
        assert raw[0][0] >= 3_000  # copies stored (unless a background merge already collapsed them)...
        assert await totals(store, team) == (3_000, prompt, completion, cost, 0)  # ...and each event counts once
        assert await dimension_totals(store, team) == tuple(sum(getattr(e, f) for e in events) for f in (
            "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens", "web_search_requests"))  # fmt: skip

        async def clean():
            return await reconcile_report(store, PERIOD, team)

        report = await eventually(clean, lambda r: r["ok"], timeout_s=30)
    (row,) = report["rows"]
    assert row["events"] == 3_000 and row["raw_rows"] >= 3_000  # merges may already have collapsed copies
    assert Decimal(row["metered_usd"]) == cost and Decimal(row["rollup_usd"]) == cost
    assert report["sequence_gaps"] == 0 and report["sequences"][0]["events"] == 3_000
    hourly = await store.query("SELECT sum(requests), sum(cost) FROM {db}.usage_daily WHERE team_id = {t:String}",
                               {"t": team})  # fmt: skip
    assert hourly[0] == (3_000, cost)


async def test_clickhouse_failing_for_a_while_loses_nothing_and_duplicates_nothing(bootstrap, store, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    flaky = FlakyStore(store)
    events = events_for(team, 2_000, f"px-{unique}")
    async with meter_task(settings(unique, topic), CONFIG, flaky, bootstrap) as task:
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events[:500]])
        await eventually(lambda: totals(store, team), lambda r: r[0] == 500)
        flaky.failing = True
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events[500:]])
        await eventually(lambda: _async(flaky.failed_attempts), lambda n: n >= 5, timeout_s=30)
        assert not task.done()  # backing off, not dead
        assert (await totals(store, team))[0] == 500
        flaky.failing = False  # ClickHouse is back: the meter resumes by itself
        await eventually(lambda: totals(store, team), lambda r: r[0] == 2_000, timeout_s=30)
    raw = await store.query("SELECT count(), uniqExact(event_id) FROM {db}.usage_events WHERE team_id = {t:String}",
                            {"t": team})  # fmt: skip
    assert raw[0][1] == 2_000
    report = await reconcile_report(store, PERIOD, team)
    assert report["sequence_gaps"] == 0 and report["totals"]["events"] == 2_000


async def _async(v):
    return v


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 4) -> dict[int, int]:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        return {p: (await probe.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)}
    finally:
        await probe.stop()


async def test_nothing_is_committed_past_a_batch_that_is_not_written(bootstrap, store, unique):
    """The pipelined meter prices batch N+1 while batch N is written, but never commits N+1 (nor anything
    after it) while N's insert keeps failing; once ClickHouse is back every offset is committed, in order."""
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    flaky = FlakyStore(store)
    events = events_for(team, 6_000, f"px-{unique}")
    async with meter_task(settings(unique, topic), CONFIG, flaky, bootstrap):
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events[:1_000]])
        await eventually(lambda: totals(store, team), lambda r: r[0] == 1_000)
        before = await eventually(lambda: committed(bootstrap, f"g-{unique}", topic),
                                  lambda c: sum(c.values()) == 1_000)  # fmt: skip
        flaky.failing = True
        ends = await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events[1_000:]])
        await eventually(lambda: _async(flaky.failed_attempts), lambda n: n >= 4, timeout_s=30)
        assert await committed(bootstrap, f"g-{unique}", topic) == before  # several batches in hand, none committed
        assert (await totals(store, team))[0] == 1_000
        flaky.failing = False
        await eventually(lambda: totals(store, team), lambda r: r[0] == 6_000, timeout_s=60)
        await eventually(lambda: committed(bootstrap, f"g-{unique}", topic), lambda c: {p: o for p, o in c.items() if o} == ends,
                         timeout_s=30)  # fmt: skip


async def test_garbage_is_dead_lettered_with_reason_in_topic_and_table(bootstrap, store, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic, partitions=1)
    bad = [
        (b"x", f"not json {unique}".encode()),
        (b"x", orjson.dumps({"event_id": "nope", "team_id": team, "marker": unique})),
        (b"x", None),
        (b"x", orjson.dumps([1, 2, unique])),
    ]
    good = make_event(team)
    async with meter_task(settings(unique, topic), CONFIG, store, bootstrap):
        await produce(bootstrap, topic, [*bad, (team.encode(), good.to_bytes())])
        await eventually(lambda: totals(store, team), lambda r: r[0] == 1)
        dead = await eventually(
            lambda: store.query_dicts("SELECT * FROM {db}.usage_dead_letters FINAL ORDER BY offset"),
            lambda r: len(r) == 4,
        )
    assert [d["offset"] for d in dead] == [0, 1, 2, 3] and all(d["topic"] == topic for d in dead)
    assert dead[1]["team_id"] == team and "event_id" in dead[1]["reason"]
    assert dead[2]["reason"].startswith("undecodable: empty")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(DLQ_TOPIC, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found = []

        async def read():
            for rec in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                d = orjson.loads(rec.value)
                if d["topic"] == topic:
                    found.append(d)
            return found

        await eventually(read, lambda f: len(f) >= 4)
    finally:
        await consumer.stop()
    assert unique.encode() in base64.b64decode(found[0]["value_b64"]) and found[0]["reason"]
    report = await reconcile_report(store, PERIOD)
    assert report["totals"]["dead_letters"] == 4


PRICELESS = parse_config({
    "providers": {"mock": {"base_url": "http://x"}},
    "models": {"gpt-4.1": {"routes": [{"provider": "mock"}],
                           "prices": [{"effective_from": "2025-04-14", "input": "2.00", "output": "8.00"}]},
               "brand-new": {"routes": [{"provider": "mock"}]}},
})  # fmt: skip
PRICED = parse_config({
    "providers": {"mock": {"base_url": "http://x"}},
    "models": {"gpt-4.1": {"routes": [{"provider": "mock"}],
                           "prices": [{"effective_from": "2025-04-14", "input": "1.50", "output": "6.00"}]},
               "brand-new": {"routes": [{"provider": "mock"}], "prices": [{"input": "1.00", "output": "3.00"}]}},
})  # fmt: skip


async def test_unpriced_is_held_then_priced_and_rerate_adjusts_once(bootstrap, store, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    new = [make_event(team, requested_model="brand-new", served_model="brand-new", prompt_tokens=1000,
                      completion_tokens=100) for _ in range(50)]  # fmt: skip
    zero = make_event(team, requested_model="brand-new", served_model="brand-new", prompt_tokens=0,
                      completion_tokens=0, usage_source="provider")  # fmt: skip
    old = [make_event(team, prompt_tokens=1_000_000, completion_tokens=1_000) for _ in range(20)]
    async with meter_task(settings(unique, topic), PRICELESS, store, bootstrap):
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in [*new, zero, *old]])
        t = await eventually(lambda: totals(store, team), lambda r: r[0] == 71)
    assert t[4] == 50  # held as unpriced: stored, counted, never dropped, never billed as zero-by-accident
    usage_zero = await store.query("SELECT prompt_tokens, priced, usage_source FROM {db}.usage_events FINAL "
                                   "WHERE event_id = {e:UUID}", {"e": zero.event_id})  # fmt: skip
    assert usage_zero == [(0, True, "provider")]  # an explicit provider zero stays zero (and needs no price)

    # A price appears: the restarted meter prices the held events on start.
    async with meter_task(settings(unique, topic), PRICED, store, bootstrap):
        t = await eventually(lambda: totals(store, team), lambda r: r[4] == 0)
    new_cost = 50 * (1000 * Decimal(1) + 100 * Decimal(3)) / MILLION
    old_cost_before = 20 * (1_000_000 * Decimal(2) + 1_000 * Decimal(8)) / MILLION  # first write wins: old price
    assert t[3] == new_cost + old_cost_before

    # The catalog says gpt-4.1 was cheaper all along: rerate writes signed adjustments, once.
    first = await rerate_period(store, PriceBook(PRICED), PERIOD)
    again = await rerate_period(store, PriceBook(PRICED), PERIOD)
    assert first.adjusted == 20 and again.adjusted == 0
    old_cost_after = 20 * (1_000_000 * Decimal("1.5") + 1_000 * Decimal(6)) / MILLION
    assert first.delta_total == old_cost_after - old_cost_before
    adj = await store.query_dicts("SELECT corrects_price_version, price_version, count() n "
                                  "FROM {db}.usage_adjustments FINAL GROUP BY 1, 2")  # fmt: skip
    # The in-place edit (same date, other unit prices) is a new version: an invoice line can never merge them.
    # (This asserted one version string for both prices: that was the bug, issue 13 finding 2.)
    ((was, now, n),) = [tuple(a.values()) for a in adj]
    assert (
        n == 20 and was != now and was.startswith("gpt-4.1/*@2025-04-14#") and now.startswith("gpt-4.1/*@2025-04-14#")
    )
    assert (await totals(store, team))[3] == new_cost + old_cost_before  # stored rows never mutated
    from services.meter.rollups import refresh_all

    await refresh_all(store)
    report = await reconcile_report(store, PERIOD, team)
    assert report["ok"], report
    assert Decimal(report["totals"]["metered_usd"]) == new_cost + old_cost_after
    assert report["totals"]["unpriced"] == 0 and report["totals"]["adjustments"] == 20


async def test_reconcile_reports_a_sequence_gap(bootstrap, store, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    events = [e for e in events_for(team, 30, f"px-{unique}") if e.proxy_seq not in (7, 20, 21)]
    async with meter_task(settings(unique, topic), CONFIG, store, bootstrap):
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in events])
        await eventually(lambda: totals(store, team), lambda r: r[0] == 27)
    report = await reconcile_report(store, PERIOD, team)
    assert not report["ok"] and report["sequence_gaps"] == 3
    assert report["sequences"][0]["missing"] == [[7, 7], [20, 21]]


async def test_responses_events_replayed_keep_every_dimension_once(bootstrap, store, unique):
    """/v1/responses events (cache reads, reasoning, web searches, a served tier, follow-ups at zero tokens)
    through replays and duplicates: each dimension summed once, priced on input / cached input / output / web search."""
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    events = [make_event(team, endpoint="responses", prompt_tokens=200 + i % 9, completion_tokens=30 + i % 4,
                         cached_tokens=i % 3 * 50, reasoning_tokens=i % 4 * 5, web_search_requests=i % 2,
                         service_tier="flex" if i % 5 == 0 else "default", stream=i % 2 == 0,
                         proxy_instance=f"px-{unique}", proxy_seq=i + 1) for i in range(600)]  # fmt: skip
    events += [make_event(team, endpoint="responses.get", prompt_tokens=0, completion_tokens=0,
                          proxy_instance=f"px-{unique}", proxy_seq=601 + i) for i in range(50)]  # fmt: skip
    payload = [(team.encode(), e.to_bytes()) for e in events]
    # gpt-4.1 as tollway.yaml prices it from 2026-12-01: web searches at $10 per 1,000 (priced since issue 15's
    # price dimensions), no flex tier (so flex calls are priced at the base rates)
    cost = sum(((e.prompt_tokens - e.cached_tokens) * Decimal("2.00") + e.cached_tokens * Decimal("0.50")
                + e.completion_tokens * Decimal("8.00")) / MILLION + e.web_search_requests * Decimal("10.00") / 1000
               for e in events)  # fmt: skip
    async with meter_task(settings(unique, topic), CONFIG, store, bootstrap):
        await produce(bootstrap, topic, payload)
        await produce(bootstrap, topic, payload[100:400])
        await produce(bootstrap, topic, payload)
        sentinel = make_event(f"{team}-sentinel")
        await produce(bootstrap, topic, [(team.encode(), sentinel.to_bytes())])
        await eventually(lambda: totals(store, f"{team}-sentinel"), lambda r: r[0] == 1, timeout_s=60)
        rows = await store.query(
            "SELECT count(), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(reasoning_tokens), "
            "sum(web_search_requests), countIf(service_tier = 'flex'), countIf(endpoint = 'responses.get'), "
            "sum(cost_total) FROM {db}.usage_events FINAL WHERE team_id = {t:String}", {"t": team})  # fmt: skip
        report = await eventually(lambda: reconcile_report(store, PERIOD, team), lambda r: r["ok"], timeout_s=30)
    assert rows[0] == (650, sum(e.prompt_tokens for e in events), sum(e.completion_tokens for e in events),
                       sum(e.cached_tokens for e in events), sum(e.reasoning_tokens for e in events),
                       sum(e.web_search_requests for e in events), 120, 50, cost)  # fmt: skip
    assert report["sequence_gaps"] == 0 and Decimal(report["rows"][0]["metered_usd"]) == cost
