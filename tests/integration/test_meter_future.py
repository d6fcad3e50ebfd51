"""A proxy clock far ahead: its events are held as dead letters (reason and metric), never stored as usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from schemas.config import load_config
from services.meter.settings import MeterSettings
from tests.support.events import make_event
from tests.support.meter_harness import create_topic, meter_task, produce
from tests.support.waiting import eventually


def future_total() -> float:
    return REGISTRY.get_sample_value("tollway_meter_future_events_total") or 0.0


async def test_events_dated_past_the_tolerance_are_dead_letters_not_usage(store, bootstrap, unique):
    topic, team = f"usage-{unique}", f"team_{unique}"
    await create_topic(bootstrap, topic)
    now = datetime.now(UTC)
    ok = [make_event(team, occurred_at=now - timedelta(seconds=i)) for i in range(20)]
    skewed = [make_event(team, occurred_at=now + timedelta(days=35, seconds=i)) for i in range(5)]  # next month
    before = future_total()
    s = MeterSettings(meter_group=f"g-{unique}", usage_topic=topic, batch_max_wait_ms=50, rollup_interval_s=0.5)
    async with meter_task(s, load_config("tollway.yaml"), store, bootstrap):
        await produce(bootstrap, topic, [(team.encode(), e.to_bytes()) for e in [*ok, *skewed]])

        async def dead() -> list[tuple]:
            return await store.query("SELECT event_id, reason FROM {db}.usage_dead_letters FINAL "
                                     "WHERE team_id = {t:String} ORDER BY event_id", {"t": team})  # fmt: skip

        held = await eventually(dead, lambda rows: len(rows) == 5, timeout_s=30)

        async def usage() -> list[tuple]:
            return await store.query("SELECT toString(event_id), occurred_at FROM {db}.usage_events FINAL "
                                     "WHERE team_id = {t:String}", {"t": team})  # fmt: skip

        stored = await eventually(usage, lambda rows: len(rows) == 20, timeout_s=30)
    assert {e for e, _ in stored} == {e.event_id for e in ok}
    assert max(at for _, at in stored).replace(tzinfo=UTC) <= now  # no row opens next month
    assert [e for e, _ in held] == sorted(e.event_id for e in skewed)
    assert all("is in the future" in reason and "300 s" in reason for _, reason in held)
    assert future_total() - before == 5
