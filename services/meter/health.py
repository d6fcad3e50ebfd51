"""HTTP for `tollway meter` run alone: GET /metrics (Prometheus), /healthz (liveness) and /readyz (readiness).

Served by aiohttp from the meter's own event loop, so a probe answers only while that loop is turning: a loop
wedged by blocking work fails its probes instead of looking healthy from a side thread.

What /readyz means (200, or 503 with the reason in a JSON body):

- "not started (<phase>)": the meter is still creating topics, opening ClickHouse or starting its consumer;
  ready once run_meter has started its consumer and producer (its `started` event);
- "stopping": shutdown began (the meter drains and commits before it exits);
- "clickhouse inserts failing since <ts>": the latest insert attempt failed and none was accepted since. The
  writer retries that batch until ClickHouse takes it and commits nothing meanwhile, so nothing is being metered;
- otherwise ready.

Deliberately not part of readiness: consumer lag (a meter replaying a backlog is doing its job, and gating on it
would take the whole fleet out during the replay after an outage; alert on tollway_meter_consumer_lag instead),
a partition assignment (replicas beyond the partition count are healthy standbys that take over on a rebalance),
and a recent insert (an idle meter has nothing to insert; start-up already reached ClickHouse for migrations).

The insert state is read from the meter's own Prometheus metrics rather than from hooks in the loop, so the
consumer and writer know nothing of probes: a rise in tollway_meter_insert_failures_total is a failed attempt; a
rise in tollway_meter_insert_seconds_count (usage rows accepted) or tollway_meter_events_total (a batch committed,
so all its inserts, dead letters included, were accepted) is an accepted insert. The metrics are sampled every
half second and on every /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from services.meter import metrics

log = structlog.get_logger("tollway.meter.health")
SAMPLE_INTERVAL_S = 0.5


def _sum(metric: Any, suffix: str) -> float:
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith(suffix))


def insert_counts() -> tuple[float, float]:
    """(failed insert attempts, accepted-insert signals) so far in this process: only their rises matter."""
    failed = _sum(metrics.INSERT_FAILURES, "_total")
    accepted = _sum(metrics.INSERT_SECONDS, "_count") + _sum(metrics.EVENTS, "_total")
    return failed, accepted


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class MeterHealth:
    """The meter's readiness, from its start-up phase, its `started`/`stop` events and its insert metrics."""

    def __init__(self, stop: asyncio.Event | None = None, clock: Callable[[], float] = time.time) -> None:
        self.started = asyncio.Event()  # handed to run_meter, which sets it once its consumer is up
        self.stop = stop
        self.phase = "starting"
        self._clock = clock
        # Counters are process-wide: only rises after this point count.
        self._failed, self._accepted = insert_counts()
        self.last_accepted_at: float | None = None
        self.failing_since: float | None = None
        self.failed_attempts = 0  # since failing_since

    def sample(self) -> None:
        failed, accepted = insert_counts()
        now = self._clock()
        if accepted > self._accepted:
            # When attempts also failed since the last look their order is unknown: take the acceptance as the
            # latest. A failure after it repeats within the writer's backoff and is caught on a later look.
            self.last_accepted_at = now
            self.failing_since = None
            self.failed_attempts = 0
        elif failed > self._failed:
            if self.failing_since is None:
                self.failing_since = now
            self.failed_attempts += int(failed - self._failed)
        self._failed, self._accepted = failed, accepted

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        self.sample()
        if self.stop is not None and self.stop.is_set():
            reason: str | None = "stopping"
        elif not self.started.is_set():
            reason = f"not started ({self.phase})"
        elif self.failing_since is not None:
            reason = f"clickhouse inserts failing since {_iso(self.failing_since)} ({self.failed_attempts} attempts)"
        else:
            reason = None
        body = {
            "status": "ready" if reason is None else "not ready",
            "reason": reason,
            "started": self.started.is_set(),
            "last_insert_accepted_at": _iso(self.last_accepted_at),
            "inserts_failing_since": _iso(self.failing_since),
        }
        return reason is None, body

    async def watch(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        """Sample between probes, so a failure streak's start is known to within `interval_s`."""
        while True:
            self.sample()
            await asyncio.sleep(interval_s)


def create_app(health: MeterHealth) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, body = health.readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(REGISTRY), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


@contextlib.asynccontextmanager
async def serving(health: MeterHealth, host: str, port: int) -> AsyncIterator[int]:
    """Serve the meter's HTTP endpoints for the life of the block; yields the bound port (`port` may be 0).
    Raises OSError when the address cannot be bound."""
    runner = web.AppRunner(create_app(health), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        sampler = asyncio.create_task(health.watch(), name="meter-health")
        log.info("meter_http_listening", host=host, port=bound)
        try:
            yield bound
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    finally:
        await runner.cleanup()
