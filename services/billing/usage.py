"""Usage reports: range parsing and query building (pure), plus one async runner.

Every read goes through the ledger's effective rows (`usage_events FINAL` + `usage_adjustments FINAL`):
a redelivered event counts once and a re-rated one at its current price, so `cost_usd` of a team-month is
the ledger's exact amount. User input reaches SQL only as bound parameters.

Fields per group and in totals:
  requests, prompt_tokens, completion_tokens, cached_tokens, total_tokens: every call in the range, of any
      status, cache hits and rejections included (what the traffic was; `cached_tokens` = provider-cached
      prompt tokens);
  cost_usd: exact effective cost (re-rating adjustments included); adjustments_usd: the part of it that
      re-rating added (signed);
  billed_requests, billed_input_tokens (uncached prompt), billed_cached_input_tokens, billed_output_tokens:
      the calls and tokens cost_usd prices (status ok/error, priced), so tokens x unit price == cost_usd;
  cache_hits, cache_hit_prompt_tokens, cache_hit_completion_tokens: answered from the gateway cache,
      billed zero;
  cache_write_tokens, cache_write_1h_tokens, web_search_requests: every call's, as reported;
  billed_cache_write_tokens, billed_cache_write_1h_tokens, billed_fee_requests (billable calls with tokens),
      billed_web_search_requests: the other quantities cost_usd prices (billed_input_tokens excludes cache
      reads and writes), so each quantity x its unit price sums to cost_usd;
  cost_input_usd, cost_cached_input_usd, cost_cache_write_usd, cost_cache_write_1h_usd, cost_output_usd,
      cost_request_usd, cost_web_search_usd: cost_usd by dimension (re-rating included); they sum to it;
  unpriced_requests: calls stored without a price (billed zero until `tollway rerate` prices them);
  quoted_requests, quoted_usd: the calls the proxy told a provisional cost (x-tollway-cost-usd, usage.cost) and
      the sum of what it told; quote_differences: those whose billed amount (cost_usd's share, 0 when not
      billable) is not exactly what they were told (a price changed before metering, a re-rate since).
group_by=model labels a model the config does not know (a rejected call's made-up name) as `(unknown)`.
group_by=end_user and group_by=tag:<name> (services/billing/attribution.py) group by the event's end user or
a tag's value (field `end_user` / `tag_value`); calls without one are the group `(none)`.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.clickhouse import Store
from schemas.clock import iso, utc
from schemas.config import GatewayConfig
from schemas.money import plain
from services.billing import attribution, ledger, metrics
from services.billing.errors import InvalidRequest

GroupBy = str  # one of GROUPS, "end_user" or "tag:<name>"

# group_by -> (response field, SQL expression). Fixed strings: the only SQL that varies by request.
GROUPS: dict[str, tuple[str, str]] = {
    "model": ("model", "x.model"),
    "day": ("day", "toDate(x.occurred_at, 'UTC')"),
    "key": ("key_id", "x.key_id"),
}
METRICS_SQL = """
    count() AS requests,
    sum(x.prompt_tokens) AS prompt_tokens,
    sum(x.completion_tokens) AS completion_tokens,
    sum(x.cached_tokens) AS cached_tokens,
    sumIf(x.cost_usd, x.billable) AS cost_usd,
    sumIf(x.adjustments_usd, x.billable) AS adjustments_usd,
    countIf(NOT x.priced) AS unpriced_requests,
    countIf(x.billable) AS billed_requests,
    sumIf(x.input_tokens, x.billable) AS billed_input_tokens,
    sumIf(x.cached_input_tokens, x.billable) AS billed_cached_input_tokens,
    sumIf(x.output_tokens, x.billable) AS billed_output_tokens,
    countIf(x.cache_hit) AS cache_hits,
    sumIf(x.prompt_tokens, x.cache_hit) AS cache_hit_prompt_tokens,
    sumIf(x.completion_tokens, x.cache_hit) AS cache_hit_completion_tokens,
    countIf(x.quoted_cost_usd != '') AS quoted_requests,
    sumIf(toDecimal128OrZero(x.quoted_cost_usd, 18), x.quoted_cost_usd != '') AS quoted_usd,
    countIf(x.quoted_cost_usd != ''
            AND toDecimal128OrZero(x.quoted_cost_usd, 18) != if(x.billable, x.cost_usd, toDecimal128(0, 18)))
        AS quote_differences,
    sum(x.cache_write_tokens) AS cache_write_tokens,
    sum(x.cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(x.web_searches) AS web_search_requests,
    sumIf(x.cache_write_input_tokens, x.billable) AS billed_cache_write_tokens,
    sumIf(x.cache_write_1h_input_tokens, x.billable) AS billed_cache_write_1h_tokens,
    sumIf(x.fee_requests, x.billable) AS billed_fee_requests,
    sumIf(x.web_searches, x.billable) AS billed_web_search_requests,""" + ",".join(
    f"\n    sumIf(x.{c}, x.billable) AS {c}" for c in ledger.COST_COLUMNS
)
# Added with the price dimensions (issue 15): the new counts, and cost_usd by dimension (they sum to it).
DIMENSION_INT_FIELDS = ("cache_write_tokens", "cache_write_1h_tokens", "web_search_requests",
                        "billed_cache_write_tokens", "billed_cache_write_1h_tokens", "billed_fee_requests",
                        "billed_web_search_requests")  # fmt: skip
INT_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "unpriced_requests",
              "billed_requests", "billed_input_tokens", "billed_cached_input_tokens", "billed_output_tokens",
              "cache_hits", "cache_hit_prompt_tokens", "cache_hit_completion_tokens", "quoted_requests",
              "quote_differences", *DIMENSION_INT_FIELDS)  # fmt: skip
MONEY_FIELDS = ("cost_usd", "adjustments_usd", "quoted_usd", *ledger.COST_COLUMNS)
# What DateTime64 can hold; outside it ClickHouse would fail or wrap, so it is the caller's error.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2299, 12, 31, tzinfo=UTC)


def parse_group_by(value: str | None) -> GroupBy | None:
    if value is None or value in ("", "none"):
        return None
    if value not in GROUPS and value != "end_user" and not value.startswith("tag:"):
        raise InvalidRequest(f"group_by: must be one of model, day, key, end_user, tag:<name> or none, got "
                             f"{value[:40]!r}")  # fmt: skip
    _grouping(value)  # a bad tag name is the caller's error now, not the query's
    return value


def _grouping(group_by: GroupBy) -> tuple[str, str, dict[str, object]]:
    """(the group's field in the response, its SQL over x, the parameters that SQL binds)."""
    if group_by in GROUPS:
        return GROUPS[group_by][0], GROUPS[group_by][1], {}
    dim = attribution.dimension(group_by)
    return dim.field, dim.sql, dim.params


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
    return utc(parsed)


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
    if team_id is not None:
        params["team"] = team_id
    select = METRICS_SQL
    tail = ""
    if group_by is not None:
        _, expr, extra = _grouping(group_by)
        params |= extra
        select = f"\n    {expr} AS g," + METRICS_SQL
        tail = "\nGROUP BY g\nORDER BY g"
    sql = f"SELECT{select}\nFROM {ledger.effective_sql(team=team_id is not None)} AS x" + tail
    return sql, params


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: int(row[name]) for name in INT_FIELDS}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    for name in MONEY_FIELDS:
        out[name] = Decimal(row[name])
    return out


PUBLIC_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "cost_usd",
                 "unpriced_requests", "adjustments_usd", "billed_requests", "billed_input_tokens",
                 "billed_cached_input_tokens", "billed_output_tokens", "cache_hits", "cache_hit_prompt_tokens",
                 "cache_hit_completion_tokens", "quoted_requests", "quoted_usd", "quote_differences",
                 *DIMENSION_INT_FIELDS, *ledger.COST_COLUMNS)  # fmt: skip


def _public(m: dict[str, Any]) -> dict[str, Any]:
    return {name: plain(m[name]) if name in MONEY_FIELDS else m[name] for name in PUBLIC_FIELDS}


def _zero() -> dict[str, Any]:
    return {name: 0 for name in (*INT_FIELDS, "total_tokens")} | {name: Decimal(0) for name in MONEY_FIELDS}


def shape_report(
    rows: list[dict[str, Any]],
    team_id: str | None,
    start: datetime,
    end: datetime,
    group_by: GroupBy | None,
    config: GatewayConfig | None = None,
) -> dict[str, Any]:
    """The response body. Totals of a grouped report are the exact sum of its groups. With a config,
    models it does not know are merged into one `(unknown)` group."""
    merged: dict[str, dict[str, Any]] = {}
    totals = _zero()
    for row in rows:
        m = _metrics(row)
        for name in totals:
            totals[name] += m[name]
        if group_by is not None:
            label = row["g"].isoformat() if isinstance(row["g"], date) else str(row["g"])
            if group_by == "model" and config is not None:
                label = ledger.report_model(label, config)
            acc = merged.setdefault(label, _zero())
            for name in acc:
                acc[name] += m[name]
    field = _grouping(group_by)[0] if group_by else ""
    groups = [{field: label, **_public(m)} for label, m in sorted(merged.items())] if group_by else []
    return {
        "team_id": team_id,
        "from": iso(start),
        "to": iso(end),
        "group_by": group_by,
        "totals": _public(totals),
        "groups": groups,
    }


async def usage_report(
    store: Store,
    team_id: str | None,
    start: datetime,
    end: datetime,
    group_by: GroupBy | None,
    config: GatewayConfig | None = None,
) -> dict[str, Any]:
    sql, params = build_query(team_id, start, end, group_by)
    began = time.perf_counter()
    rows = await store.query_dicts(sql, parameters=params)
    metrics.USAGE_QUERY_SECONDS.observe(time.perf_counter() - began)
    metrics.USAGE_QUERIES.labels(group_by=group_by or "none").inc()
    return shape_report(rows, team_id, start, end, group_by, config)
