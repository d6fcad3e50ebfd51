"""Usage reports over `usage_events`: range parsing and query building (pure), plus one async runner.

Every read uses FINAL: the table collapses redelivered events by event_id only at read time, so a
query without it could count one call twice. User input reaches SQL only as bound parameters.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from schemas.clickhouse import Store
from services.billing import metrics
from services.billing.errors import InvalidRequest

GroupBy = Literal["model", "day", "key"]

# group_by -> (response field, SQL expression). Fixed strings: the only SQL that varies by request.
GROUPS: dict[str, tuple[str, str]] = {
    "model": ("model", "if(served_model = '', requested_model, served_model)"),
    "day": ("day", "toDate(occurred_at, 'UTC')"),
    "key": ("key_id", "key_id"),
}
METRICS_SQL = """
    count() AS requests,
    sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(cost_total) AS cost_usd,
    countIf(NOT priced) AS unpriced_requests"""
INT_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "unpriced_requests")
# What DateTime64 can hold; outside it ClickHouse would fail or wrap, so it is the caller's error.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2299, 12, 31, tzinfo=UTC)


def parse_group_by(value: str | None) -> GroupBy | None:
    if value is None or value in ("", "none"):
        return None
    if value not in GROUPS:
        raise InvalidRequest(f"group_by: must be one of model, day, key or none, got {value[:40]!r}")
    return value  # type: ignore[return-value]


def parse_instant(value: str, field: str, *, end: bool = False) -> datetime:
    """An ISO date or datetime as a UTC instant. A bare date as `to` covers that whole day."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{field}: expected an ISO date (YYYY-MM-DD) or datetime (YYYY-MM-DDTHH:MM:SSZ), got {value[:40]!r}"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def parse_range(start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    """[from, to) in UTC; defaults to the current UTC month up to now."""
    lo = parse_instant(start, "from") if start else month_start(now)
    hi = parse_instant(end, "to", end=True) if end else now
    for name, t in (("from", lo), ("to", hi)):
        if not EARLIEST <= t <= LATEST:
            raise InvalidRequest(f"{name}: must fall between 1900-01-01 and 2299-12-31")
    if lo >= hi:
        raise InvalidRequest("from: must be earlier than to")
    return lo, hi


def build_query(
    team_id: str | None, start: datetime, end: datetime, group_by: GroupBy | None
) -> tuple[str, dict[str, Any]]:
    """SQL with `{name:Type}` placeholders, and the parameters to bind to them."""
    params: dict[str, Any] = {"start": start, "end": end}
    where = ["occurred_at >= {start:DateTime64(6, 'UTC')}", "occurred_at < {end:DateTime64(6, 'UTC')}"]
    if team_id is not None:
        where.append("team_id = {team_id:String}")
        params["team_id"] = team_id
    select = METRICS_SQL
    tail = ""
    if group_by is not None:
        select = f"\n    {GROUPS[group_by][1]} AS g," + METRICS_SQL
        tail = "\nGROUP BY g\nORDER BY g"
    sql = f"SELECT{select}\nFROM {{db}}.usage_events FINAL\nWHERE " + "\n  AND ".join(where) + tail
    return sql, params


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: int(row[name]) for name in INT_FIELDS}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["cost_usd"] = Decimal(row["cost_usd"])
    return out


def money(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros: Decimal('1.500000000000000000') -> '1.5'."""
    return format(value.normalize(), "f") if value else "0"


def _public(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": m["requests"],
        "prompt_tokens": m["prompt_tokens"],
        "completion_tokens": m["completion_tokens"],
        "cached_tokens": m["cached_tokens"],
        "total_tokens": m["total_tokens"],
        "cost_usd": money(m["cost_usd"]),
        "unpriced_requests": m["unpriced_requests"],
    }


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def shape_report(
    rows: list[dict[str, Any]], team_id: str | None, start: datetime, end: datetime, group_by: GroupBy | None
) -> dict[str, Any]:
    """The response body. Totals of a grouped report are the exact sum of its groups."""
    groups: list[dict[str, Any]] = []
    totals = {name: 0 for name in (*INT_FIELDS, "total_tokens")} | {"cost_usd": Decimal(0)}
    for row in rows:
        m = _metrics(row)
        for name in totals:
            totals[name] += m[name]
        if group_by is not None:
            label = row["g"].isoformat() if isinstance(row["g"], date) else str(row["g"])
            groups.append({GROUPS[group_by][0]: label, **_public(m)})
    return {
        "team_id": team_id,
        "from": _iso(start),
        "to": _iso(end),
        "group_by": group_by,
        "totals": _public(totals),
        "groups": groups,
    }


async def usage_report(
    store: Store, team_id: str | None, start: datetime, end: datetime, group_by: GroupBy | None
) -> dict[str, Any]:
    sql, params = build_query(team_id, start, end, group_by)
    began = time.perf_counter()
    rows = await store.query_dicts(sql, parameters=params)
    metrics.USAGE_QUERY_SECONDS.observe(time.perf_counter() - began)
    metrics.USAGE_QUERIES.labels(group_by=group_by or "none").inc()
    return shape_report(rows, team_id, start, end, group_by)
