"""The built-in dashboard: `GET /dashboard` (a static page and its assets, shipped in the package) and
`GET /v1/dashboard/data` (one JSON document of everything the page draws, read from the hourly rollups).

The page holds no data and needs no auth to load; it asks for a token (admin, finance or a team key),
keeps it in sessionStorage and sends it as `Authorization: Bearer` to the JSON APIs, so a token never
appears in a URL or an access log. A team key sees only its own team (the usual `team_scope`).
Quota gauges and ROI come from `/v1/quota` and `/v1/reports/roi`, called by the page itself.

Spend comes from the hourly rollups, which the meter recomputes from the same rows the ledger reads (events
FINAL + re-rating adjustments FINAL, by the event's hour, billed model = served or else requested), so a
team-month's spend here is the ledger's amount once the rollup pass has run (reconciliation checks it).
Models the config does not know (a rejected call's made-up name) are one `(unknown)` row.

Filters (`?end_user=` and `?tag=name=value`, services/billing/attribution.py): the rollups have no end-user or
tag dimension (tags are an open map, one rollup row per tag value would multiply the table by their
cardinality for a view few open), so a filtered view reads the ledger's effective rows instead, event by
event, under the report budget (report_budget.py: time, memory and threads per query); every section keeps
its meaning, and a filtered total is the ledger's amount for those calls without waiting for a rollup pass.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from schemas.clickhouse import Store
from schemas.clock import iso
from schemas.config import GatewayConfig
from schemas.money import plain
from schemas.periods import period_of
from services.billing import attribution, ledger
from services.billing.auth import Caller, current_caller, team_scope
from services.billing.errors import InvalidRequest
from services.billing.usage import parse_range

router = APIRouter(tags=["dashboard"])

STATIC = resources.files("services.billing") / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
}
# The page loads nothing from elsewhere: it works offline, and an injected script could not phone home.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
MAX_KEYS = 50
MAX_BUCKETS = 1_000
DAY_BUCKETS_AFTER = timedelta(days=3)  # longer ranges are drawn per day, shorter ones per hour


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    html = (STATIC / "dashboard.html").read_text()
    return Response(
        html, media_type="text/html; charset=utf-8", headers={**SECURITY_HEADERS, "cache-control": "no-store"}
    )


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:  # a fixed list: no path ever reaches the filesystem from the URL
        raise InvalidRequest(f"no dashboard asset {name[:60]!r}")
    body = (STATIC / name).read_bytes()
    return Response(body, media_type=ASSETS[name], headers={**SECURITY_HEADERS, "cache-control": "max-age=300"})


# -- data ---------------------------------------------------------------------------------------------

_SUMS = """
    sum(requests) AS requests, sum(errors) AS errors, sum(cache_hits) AS cache_hits,
    sum(unpriced) AS unpriced_requests, sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens, sum(cost) AS cost_usd"""
_INT_FIELDS = ("requests", "errors", "cache_hits", "unpriced_requests", "prompt_tokens", "completion_tokens",
               "cached_tokens")  # fmt: skip


def _where(team_id: str | None, column: str = "hour", ts: str = "DateTime('UTC')") -> str:
    where = f"{column} >= {{start:{ts}}} AND {column} < {{end:{ts}}}"
    return where + (" AND team_id = {team:String}" if team_id is not None else "")


def build_queries(team_id: str | None, granularity: str, filtered: str | None = None) -> dict[str, str]:
    """SQL per section of the page; every one reads a dedup-aware rollup or view, bound parameters only.
    `filtered` (a condition over the ledger's effective row x): read those events from the ledger instead."""
    bucket = "toStartOfDay(hour)" if granularity == "day" else "hour"
    # one type per parameter in a query: the ledger's range is DateTime64(6)
    ts = "DateTime('UTC')" if filtered is None else "DateTime64(6, 'UTC')"
    w = _where(team_id, ts=ts)
    hourly, savings, unpriced = "{db}.usage_hourly_v", "{db}.cache_savings_hourly", "{db}.unpriced_events_v"
    if filtered is not None:
        eff = f"{ledger.effective_sql(team=team_id is not None)} AS x WHERE {filtered}"
        hourly = (f"(SELECT toStartOfHour(x.occurred_at) AS hour, x.team_id AS team_id, x.key_id AS key_id, "
                  f"x.model AS model, 1 AS requests, toUInt64(x.status = 'error') AS errors, "
                  f"toUInt64(x.cache_hit) AS cache_hits, toUInt64(NOT x.priced) AS unpriced, x.prompt_tokens AS "
                  f"prompt_tokens, x.completion_tokens AS completion_tokens, x.cached_tokens AS cached_tokens, "
                  f"x.cost_usd AS cost FROM {eff})")  # fmt: skip
        # what the hits would have cost, in every price dimension (as 034's cache_savings_hourly view)
        savings = (f"(SELECT toStartOfHour(x.occurred_at) AS hour, x.team_id AS team_id, (toDecimal128(x.input_tokens, "
                   f"0) * x.unit_input + toDecimal128(x.cached_input_tokens, 0) * x.unit_cached_input + toDecimal128("
                   f"x.cache_write_input_tokens, 0) * x.unit_cache_write + toDecimal128(x.cache_write_1h_input_tokens, "
                   f"0) * x.unit_cache_write_1h + toDecimal128(x.output_tokens, 0) * x.unit_output + toDecimal128("
                   f"x.fee_requests, 0) * x.unit_request * 1000000 + toDecimal128(x.web_searches, 0) * "
                   f"x.unit_web_search * 1000) / 1000000 AS savings_usd FROM {eff} AND x.cache_hit)")  # fmt: skip
        unpriced = (f"(SELECT x.occurred_at AS occurred_at, x.team_id AS team_id, x.requested_model AS requested_model, "
                    f"x.served_model AS served_model, x.prompt_tokens AS prompt_tokens, x.completion_tokens AS "
                    f"completion_tokens FROM {eff} AND NOT x.priced)")  # fmt: skip
    return {
        "totals": f"SELECT {_SUMS} FROM {hourly} WHERE {w}",
        "series": f"SELECT {bucket} AS t, {_SUMS} FROM {hourly} WHERE {w} GROUP BY t ORDER BY t",
        "by_team": f"SELECT team_id, {_SUMS} FROM {hourly} WHERE {w} GROUP BY team_id ORDER BY cost_usd DESC",
        "by_model": f"SELECT model, {_SUMS} FROM {hourly} WHERE {w} GROUP BY model ORDER BY cost_usd DESC",
        "by_key": f"SELECT key_id, any(team_id) AS key_team, {_SUMS} FROM {hourly} WHERE {w} "
        f"GROUP BY key_id ORDER BY cost_usd DESC LIMIT {MAX_KEYS}",
        "savings": f"SELECT sum(savings_usd) AS savings_usd FROM {savings} WHERE {w}",
        "unpriced": f"SELECT {ledger.BILLED_MODEL_SQL} AS model, count() AS requests, "
        f"sum(prompt_tokens + completion_tokens) AS tokens FROM {unpriced} WHERE "
        f"{_where(team_id, 'occurred_at', ts)} GROUP BY model ORDER BY requests DESC LIMIT 20",
    }


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {f: int(row.get(f) or 0) for f in _INT_FIELDS}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["cost_usd"] = plain(Decimal(row.get("cost_usd") or 0))
    return out


def bucket_starts(start: datetime, end: datetime, granularity: str) -> list[datetime]:
    step = timedelta(days=1) if granularity == "day" else timedelta(hours=1)
    t = start.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        t = t.replace(hour=0)
    out = []
    while t < end and len(out) < MAX_BUCKETS:
        out.append(t)
        t += step
    return out


def _bucket_models(rows: list[dict[str, Any]], fields: tuple[str, ...], config: GatewayConfig | None,
                   order: str) -> list[dict[str, Any]]:  # fmt: skip
    """Rows keyed by `model`, with names the config does not know merged into one row (sums of `fields`)."""
    if config is None:
        return rows
    merged: dict[str, dict[str, Any]] = {}
    for r in rows:
        label = ledger.report_model(r["model"], config)
        acc = merged.setdefault(label, {"model": label} | dict.fromkeys(fields, 0))
        for f in fields:
            acc[f] += r.get(f) or 0
    return sorted(merged.values(), key=lambda r: (-r[order], r["model"]))


def shape(rows: dict[str, list[dict[str, Any]]], names: dict[str, str], keys: dict[str, dict[str, Any]],
          buckets: list[datetime], config: GatewayConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """The response body from the query results (pure). Money stays a decimal string."""
    totals = _metrics(rows["totals"][0] if rows["totals"] else {})
    totals["cache_hit_rate"] = round(totals["cache_hits"] / totals["requests"], 4) if totals["requests"] else 0.0
    savings = rows["savings"][0]["savings_usd"] if rows["savings"] else 0
    totals["cache_savings_usd"] = plain(Decimal(savings or 0))
    found = {iso(r["t"]): _metrics(r) for r in rows["series"]}
    # Every bucket of the range, empty ones as zeros, so a chart's time axis is the range asked for.
    series = [{"t": t, **found.pop(t, _metrics({}))} for t in (iso(b) for b in buckets)]
    series += [{"t": t, **m} for t, m in sorted(found.items())]  # outside the grid: never silently dropped
    series.sort(key=lambda p: p["t"])
    by_team = [{"team_id": r["team_id"], "name": names.get(r["team_id"], r["team_id"]), **_metrics(r)}
               for r in rows["by_team"]]  # fmt: skip
    model_rows = _bucket_models(rows["by_model"], (*_INT_FIELDS, "cost_usd"), config, "cost_usd")
    by_model = [{"model": r["model"], **_metrics(r)} for r in model_rows]
    by_key = []
    for r in rows["by_key"]:
        k = keys.get(r["key_id"], {})
        by_key.append({"key_id": r["key_id"], "prefix": k.get("prefix"), "name": k.get("name"),
                       "team_id": r["key_team"], "team": names.get(r["key_team"], r["key_team"]), **_metrics(r)})  # fmt: skip
    unpriced = [
        {"model": r["model"], "requests": int(r["requests"]), "tokens": int(r["tokens"])}
        for r in _bucket_models(rows["unpriced"], ("requests", "tokens"), config, "requests")
    ]
    return {"totals": totals, "series": series, "by_team": by_team, "by_model": by_model, "by_key": by_key,
            "unpriced": {"requests": sum(u["requests"] for u in unpriced), "models": unpriced}}  # fmt: skip


async def dashboard_data(store: Store, team_id: str | None, start: datetime, end: datetime, granularity: str,
                         names: dict[str, str], keys: dict[str, dict[str, Any]], config: GatewayConfig | None = None,
                         where: attribution.Filter | None = None) -> dict[str, Any]:  # fmt: skip
    # Rollup hours are whole: widen the range to the hours it touches.
    lo = start.replace(minute=0, second=0, microsecond=0)
    hi = (
        end
        if end == end.replace(minute=0, second=0, microsecond=0)
        else end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    )
    params: dict[str, Any] = {"start": lo, "end": hi} | ({"team": team_id} if team_id is not None else {})
    if where is not None:
        params |= where.params
    rows = {
        name: await store.query_dicts(sql, parameters=params)
        for name, sql in build_queries(team_id, granularity, where.sql if where else None).items()
    }
    return shape(rows, names, keys, bucket_starts(lo, hi, granularity), config)


@router.get("/v1/dashboard/data")
async def get_dashboard_data(
    request: Request,
    team: str | None = None,
    start: str | None = Query(default=None, alias="from"),
    end: str | None = Query(default=None, alias="to"),
    end_user: str | None = None,
    tag: str | None = None,
    caller: Caller = Depends(current_caller),
) -> dict[str, Any]:
    where = attribution.filter_of(end_user, tag)
    accounts = request.app.state.accounts
    team_id = team_scope(caller, team, accounts)
    now = datetime.now(UTC)
    lo, hi = parse_range(start, end, now)
    granularity = "day" if hi - lo > DAY_BUCKETS_AFTER else "hour"
    visible = [t for t in accounts.teams() if caller.role != "team" or t.team_id == caller.team_id]
    names = {t.team_id: t.name for t in visible}
    keys = {k.key_id: {"prefix": k.prefix, "name": k.name} for k in accounts.keys(team_id)}
    began = time.perf_counter()
    body = await dashboard_data(
        request.app.state.store, team_id, lo, hi, granularity, names, keys, request.app.state.config, where
    )
    return {
        "object": "dashboard",
        "role": caller.role,
        "team_id": team_id,
        "teams": [{"team_id": t.team_id, "name": t.name} for t in visible],
        "from": iso(lo),
        "to": iso(hi),
        "granularity": granularity,
        "filter": where.shown if where else None,
        "period": period_of(now),
        "generated_at": iso(now),
        "query_ms": round((time.perf_counter() - began) * 1000, 1),
        **body,
    }
