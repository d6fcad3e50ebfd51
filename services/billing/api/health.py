"""Liveness, readiness and Prometheus metrics (unauthenticated, as probes and scrapers expect).

`/readyz` is 200 when billing can do all its work: ClickHouse answers, the control publisher is connected
with nothing waiting in its outbox, and the quota loop follows the usage stream. Otherwise 503 with the
checks that failed: reads and admin writes are still served (an outage of the broker only delays what the
proxies are told), so a load balancer may keep routing to it; page on it instead."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        await state.store.query_dicts("SELECT 1 AS ok")
        clickhouse = True
    except Exception:
        clickhouse = False
    checks = {
        "clickhouse": clickhouse,
        "control_publisher": state.publisher.connected and state.publisher.pending == 0,
        "usage_stream": state.quota.ready.is_set(),
    }
    return JSONResponse({"status": "ok" if all(checks.values()) else "degraded", "checks": checks},
                        status_code=200 if all(checks.values()) else 503)  # fmt: skip


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
