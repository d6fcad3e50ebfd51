"""The standalone meter's readiness (services/meter/health.py), driven through the real meter metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.meter import metrics
from services.meter.health import MeterHealth, create_app
from services.meter.settings import MeterSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def failed_attempt(table: str = "usage_events") -> None:
    metrics.INSERT_FAILURES.labels(table).inc()


def accepted_insert() -> None:
    metrics.INSERT_SECONDS.observe(0.01)


def reason(health: MeterHealth) -> str | None:
    ready, body = health.readiness()
    assert ready is (body["reason"] is None)
    return body["reason"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_not_ready_until_the_consumer_started_naming_the_phase(clock: Clock) -> None:
    health = MeterHealth(asyncio.Event(), clock=clock)
    assert reason(health) == "not started (starting)"
    health.phase = "opening ClickHouse"
    assert reason(health) == "not started (opening ClickHouse)"
    health.started.set()
    assert reason(health) is None


async def test_an_idle_started_meter_is_ready_and_stopping_is_not(clock: Clock) -> None:
    stop = asyncio.Event()
    health = MeterHealth(stop, clock=clock)
    health.started.set()
    clock.now += 3600  # nothing inserted for an hour: idle, not broken
    assert reason(health) is None
    stop.set()
    assert reason(health) == "stopping"


async def test_failing_inserts_make_it_unready_until_one_is_accepted(clock: Clock) -> None:
    health = MeterHealth(asyncio.Event(), clock=clock)
    health.started.set()
    failed_attempt()
    health.sample()
    clock.now += 5
    failed_attempt("usage_dead_letters")  # any table: the batch is not committed either way
    failed_attempt()
    ready, body = health.readiness()
    assert not ready
    assert body["reason"] == "clickhouse inserts failing since 2027-01-15T08:00:00.000+00:00 (3 attempts)"
    assert body["inserts_failing_since"] == "2027-01-15T08:00:00.000+00:00"
    assert body["status"] == "not ready" and body["started"] is True
    clock.now += 5
    accepted_insert()
    ready, body = health.readiness()
    assert ready and body["reason"] is None and body["inserts_failing_since"] is None
    assert body["last_insert_accepted_at"] == "2027-01-15T08:00:10.000+00:00"


async def test_a_committed_batch_counts_as_accepted_too(clock: Clock) -> None:
    # All-dead batches insert no usage rows (no insert latency observed) but still commit and count events.
    health = MeterHealth(asyncio.Event(), clock=clock)
    health.started.set()
    failed_attempt("usage_dead_letters")
    assert reason(health) is not None
    metrics.EVENTS.labels("dead").inc(3)
    assert reason(health) is None


async def test_failures_before_this_health_object_existed_do_not_count(clock: Clock) -> None:
    failed_attempt()  # the counters are process-wide
    health = MeterHealth(asyncio.Event(), clock=clock)
    health.started.set()
    assert reason(health) is None


async def test_a_failure_after_recovery_starts_a_new_streak(clock: Clock) -> None:
    health = MeterHealth(asyncio.Event(), clock=clock)
    health.started.set()
    failed_attempt()
    assert reason(health) is not None
    accepted_insert()
    assert reason(health) is None
    clock.now += 60
    failed_attempt()
    assert health.readiness()[1]["inserts_failing_since"] == "2027-01-15T08:01:00.000+00:00"


async def test_the_routes_answer_with_status_codes_and_bodies(clock: Clock) -> None:
    health = MeterHealth(asyncio.Event(), clock=clock)
    async with TestClient(TestServer(create_app(health))) as client:
        r = await client.get("/healthz")
        assert r.status == 200 and (await r.json()) == {"status": "ok"}
        r = await client.get("/readyz")
        body: dict[str, Any] = await r.json()
        assert r.status == 503 and body["reason"] == "not started (starting)"
        health.started.set()
        assert (await client.get("/readyz")).status == 200
        failed_attempt()
        r = await client.get("/readyz")
        assert r.status == 503 and (await r.json())["reason"].startswith("clickhouse inserts failing since ")
        r = await client.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "tollway_meter_insert_failures_total" in await r.text()
        r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await client.get("/nope")).status == 404


def test_the_port_keeps_its_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOLLWAY_METER_HTTP_PORT", "TOLLWAY_METER_METRICS_PORT", "TOLLWAY_METER_HTTP_HOST"):
        monkeypatch.delenv(name, raising=False)
    s = MeterSettings()
    assert s.http_port is None and s.meter_http_host == "0.0.0.0"  # off by default; all interfaces when on
    monkeypatch.setenv("TOLLWAY_METER_METRICS_PORT", "9464")
    assert MeterSettings().http_port == 9464
    monkeypatch.setenv("TOLLWAY_METER_HTTP_PORT", "9191")
    assert MeterSettings().http_port == 9191  # the new name wins
