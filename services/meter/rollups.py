"""Hourly rollups per team, key and model, recomputed from deduplicated data (see 005_usage_rollups.sql).

A pass finds the (team, hour) buckets that received events or adjustments since the previous pass (by
`ingested_at` / `created_at`, with slack for inserts still in flight) and rewrites those buckets whole from
`usage_events FINAL` + `usage_adjustments FINAL`. Recomputing instead of incrementing is what makes the
rollups immune to duplicates and replays; the newest recomputation of a bucket wins (version = now).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import structlog

from schemas.billed import BILLED_MODEL_SQL
from schemas.clickhouse import Store
from services.meter import metrics

log = structlog.get_logger("tollway.meter.rollups")

_DIRTY = """
    SELECT DISTINCT team_id, toStartOfHour(occurred_at) FROM {db}.usage_events
    WHERE ingested_at >= {since:DateTime64(3, 'UTC')}
    UNION DISTINCT
    SELECT DISTINCT team_id, toStartOfHour(occurred_at) FROM {db}.usage_adjustments
    WHERE created_at >= {since:DateTime64(3, 'UTC')}"""

REFRESH_SQL = f"""
INSERT INTO {{db}}.usage_hourly
SELECT e.hour, e.team_id, e.key_id, e.model, e.requests, e.errors, e.cache_hits, e.unpriced, e.prompt_tokens,
       e.completion_tokens, e.cached_tokens, e.cost, a.adjustments, e.latency_state, now64(3),
       toUnixTimestamp64Milli(now64(3))
FROM (
    SELECT toStartOfHour(occurred_at) AS hour, team_id, key_id,
           {BILLED_MODEL_SQL} AS model,
           count() AS requests, countIf(status = 'error') AS errors, countIf(cache_hit) AS cache_hits,
           countIf(NOT priced) AS unpriced, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens,
           sum(cost_total) AS cost, quantilesState(0.5, 0.95, 0.99)(latency_ms) AS latency_state
    FROM {{db}}.usage_events FINAL
    WHERE (team_id, toStartOfHour(occurred_at)) IN ({_DIRTY})
    GROUP BY hour, team_id, key_id, model
) AS e
LEFT JOIN (
    SELECT toStartOfHour(occurred_at) AS hour, team_id, key_id, model, sum(delta_total) AS adjustments
    FROM {{db}}.usage_adjustments FINAL
    WHERE (team_id, toStartOfHour(occurred_at)) IN ({_DIRTY})
    GROUP BY hour, team_id, key_id, model
) AS a ON e.hour = a.hour AND e.team_id = a.team_id AND e.key_id = a.key_id AND e.model = a.model
"""


async def refresh(store: Store, since: datetime) -> None:
    """Recompute every hourly bucket touched since `since` (inclusive)."""
    t0 = time.perf_counter()
    await store.command(REFRESH_SQL, parameters={"since": since})
    metrics.ROLLUP_SECONDS.observe(time.perf_counter() - t0)


async def refresh_all(store: Store) -> None:
    await refresh(store, datetime(1970, 1, 1, tzinfo=UTC))


async def run_rollups(store: Store, stop: asyncio.Event, interval_s: float, catchup_s: float,
                      slack_s: float = 30.0) -> None:  # fmt: skip
    """Loop until `stop`: a pass every `interval_s`. The first pass looks back `catchup_s`, which covers a
    meter killed after committing a batch but before its rollup pass."""
    since = datetime.now(UTC) - timedelta(seconds=catchup_s)
    while True:
        started = datetime.now(UTC)
        try:
            await refresh(store, since)
            since = started - timedelta(seconds=slack_s)
        except Exception as err:
            metrics.ROLLUP_FAILURES.inc()
            log.warning("rollup_refresh_failed", error=str(err)[:300], since=since.isoformat())
        if stop.is_set():
            return  # that was the final pass, run after the last commit of a graceful shutdown
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
