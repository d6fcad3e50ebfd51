"""The ledger: the one definition of what a team owes, from deduplicated rows, exact Decimal before rounding.

An event's *effective* row (`effective_sql`) is its `usage_events FINAL` row (redeliveries, replays and
re-inserts collapse by event_id; a priced copy beats an unpriced one by row_version) joined with its
`usage_adjustments FINAL` rows (re-rating): the price version and unit prices of its latest adjustment
(highest `seq`) if it has one, else its own; effective cost = cost_total + sum(delta_total). The two are the
same number: a rerate writes delta = (tokens at the new price) - (current cost), so cost + deltas is always
the tokens at the effective unit prices.

Rules stated once (the first two in `schemas/billed.py`, so the meter's rollups can share them; re-exported
here) and imported everywhere else:
  * billed model (`BILLED_MODEL_SQL`): the served model, or the requested one when none served;
  * billable (`BILLABLE_STATUSES`): status ok or error (a cache hit and a rejection are billed zero);
    a billable row that is not priced is *unpriced*: counted, billed zero until `tollway rerate` prices it;
  * components (`COMPONENTS`, schemas/prices.py's dimensions): `cached_input` = min(cached, prompt),
    `cache_write` / `cache_write_1h` = the cache writes, clipped to what prompt_tokens leaves, `input` = the rest
    of the prompt (uncached, unwritten), `output` = completion tokens, `request` = billable calls that have
    tokens, `web_search` = web search requests; amount of a line = quantity x unit price / PER[component]
    (per 1M tokens, per request, per 1,000 searches), exact;
  * attachment: an adjustment row carries its event's `occurred_at`, so it belongs to the period of the
    event it corrects. That is the view every function here gives ("by event period"). Invoices carry an
    adjustment of a finalized period to the first period that is not finalized; which adjustments are new
    since a set of finalized invoices is the invoices module's business, built on `team_month` of the closed
    period;
  * report bucket (`report_model`): a model name that the config does not know (e.g. a rejected call's
    made-up model) is shown as `UNKNOWN_MODEL` in reports; the stored event keeps what the caller sent.

Public API (stable: add, don't change):
  BILLED_MODEL_SQL, BILLABLE_STATUSES, COMPONENTS, UNKNOWN_MODEL
  effective_sql(team: bool = False, ingested_before: bool = False) -> str
      SQL of a subquery, one effective row per deduplicated event with occurred_at in
      [{start:DateTime64(6, 'UTC')}, {end:DateTime64(6, 'UTC')}) (and team_id = {team:String} when team,
      ingested_at <= {ingested_before:DateTime64(6, 'UTC')} when ingested_before). Columns: event_id,
      occurred_at, ingested_at, team_id, key_id, model, requested_model, served_model, provider, status,
      priced, billable, cache_hit, prompt_tokens, completion_tokens, cached_tokens, input_tokens,
      cached_input_tokens, output_tokens, price_version, unit_input, unit_output, unit_cached_input,
      stored_cost, adjustments_usd, adjustment_count, cost_usd, end_user ('' for none), metadata (the event's
      tags: the caller's, under the key's), quoted_cost_usd (what the proxy told the caller, exact text, ''
      none). `billable` = billable status AND priced.
      Added with the price dimensions: cache_write_tokens, cache_write_1h_tokens, service_tier (as stored),
      cache_write_input_tokens, cache_write_1h_input_tokens (billed, clipped), fee_requests, web_searches,
      price_tier, unit_cache_write, unit_cache_write_1h, unit_request, unit_web_search, and the effective cost
      per dimension cost_input_usd ... cost_web_search_usd (`COST_COLUMNS`, summing to cost_usd) (`input_tokens` is the
      prompt less cache reads AND writes: unchanged for every call without cache writes).
  LedgerLine(model, price_version, component, unit_usd_per_1m, quantity, requests)  .exact_usd
  LedgerGroup(model, price_version, unit_input, unit_output, unit_cached_input, requests,
              input_tokens, cached_tokens, output_tokens, price_tier, unit_cache_write, unit_cache_write_1h,
              unit_request, unit_web_search, cache_write_tokens, cache_write_1h_tokens, fee_requests,
              web_searches)  .lines()  .exact_usd
  TeamMonth(team_id, period, groups, unpriced)  .lines()  .exact_usd  .by_model() -> {model: Decimal}
  await groups(store, start, end, team_id=None, ingested_before=None) -> (list[LedgerGroup], unpriced: int)
      billable usage grouped by (model, price_version, unit prices); one group never merges two unit prices;
      `ingested_before` counts only events ingested at or before it (an invoice "as of" its finalization).
  await groups_by_label(store, start, end, label_sql, params, team_id=None, ingested_before=None)
      -> {label: list[LedgerGroup]}: `groups` split by a label expression over the effective row `x` (an end
      user, a tag's value); the groups of all labels together are `groups`' (attribution breakdowns).
  await groups_by_team(store, start, end, team_id=None) -> {team_id: (list[LedgerGroup], unpriced)}
      the same, per team, in one query (reconciliation of every team).
  await team_month(store, team_id, period, ingested_before=None) -> TeamMonth
      a UTC month's billable usage, adjustments attached by event period.
  await month_to_date(store, period, ingested_before=None) -> list[MonthToDate]
      per (team_id, key_id): billable tokens (priced or not), exact usd, last occurred_at, unpriced count:
      the quota seed.
  report_model(model, config) -> str
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from schemas.billed import BILLABLE_STATUSES, BILLABLE_STATUSES_SQL, BILLED_MODEL_SQL
from schemas.clickhouse import Store
from schemas.clock import utc
from schemas.config import GatewayConfig
from schemas.periods import bounds
from schemas.prices import DIMENSIONS, PER
from schemas.quota import QUOTA_TOKENS_SQL

__all__ = ["BILLABLE_STATUSES", "BILLED_MODEL_SQL", "COMPONENTS", "UNKNOWN_MODEL", "LedgerGroup", "LedgerLine",
           "MonthToDate", "TeamMonth", "effective_sql", "groups", "groups_by_label", "groups_by_team", "month_to_date",
           "report_model", "team_month"]  # fmt: skip

# The invoice's order: input, cached input, cache write 5m, cache write 1h, output, requests, web search.
COMPONENTS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "request", "web_search")
UNKNOWN_MODEL = "(unknown)"
ZERO = Decimal(0)

_RANGE = "occurred_at >= {start:DateTime64(6, 'UTC')} AND occurred_at < {end:DateTime64(6, 'UTC')}"

_EFFECTIVE_SQL = """(
SELECT e.event_id AS event_id, e.occurred_at AS occurred_at, e.ingested_at AS ingested_at,
       e.team_id AS team_id, e.key_id AS key_id, e.model AS model, e.requested_model AS requested_model,
       e.served_model AS served_model, e.provider AS provider, e.status AS status, e.priced AS priced,
       e.status IN ({statuses}) AND e.priced AS billable, e.cache_hit AS cache_hit,
       e.prompt_tokens AS prompt_tokens, e.completion_tokens AS completion_tokens, e.cached_tokens AS cached_tokens,
       least(e.cached_tokens, e.prompt_tokens) AS cached_input_tokens,
       least(e.cache_write_tokens, e.prompt_tokens - cached_input_tokens) AS cache_write_input_tokens,
       least(e.cache_write_1h_tokens, e.prompt_tokens - cached_input_tokens - cache_write_input_tokens)
           AS cache_write_1h_input_tokens,
       e.prompt_tokens - cached_input_tokens - cache_write_input_tokens - cache_write_1h_input_tokens AS input_tokens,
       e.completion_tokens AS output_tokens, toUInt64(e.prompt_tokens > 0 OR e.completion_tokens > 0) AS fee_requests,
       toUInt64(e.web_search_requests) AS web_searches, e.service_tier AS service_tier,
       e.cache_write_tokens AS cache_write_tokens, e.cache_write_1h_tokens AS cache_write_1h_tokens,
       if(a.n > 0, a.pv, e.price_version) AS price_version, if(a.n > 0, a.pt, e.price_tier) AS price_tier,
       {units},
       e.cost_total AS stored_cost, a.delta AS adjustments_usd, a.n AS adjustment_count,
       e.cost_total + a.delta AS cost_usd, {costs}, e.end_user AS end_user, e.metadata AS metadata,
       e.quoted_cost_usd AS quoted_cost_usd
FROM (SELECT event_id, occurred_at, ingested_at, team_id, key_id, {model} AS model, requested_model, served_model,
             provider, status, priced, cache_hit, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
             cache_write_1h_tokens, web_search_requests, service_tier, price_version, price_tier, {unit_cols},
             {cost_cols}, cost_total, end_user, metadata, quoted_cost_usd
      FROM {{db}}.usage_events FINAL WHERE {range}{events_where}) AS e
LEFT JOIN (
    SELECT event_id, count() AS n, argMax(price_version, seq) AS pv, argMax(price_tier, seq) AS pt,
           {adj_units}, {adj_deltas}, sum(delta_total) AS delta
    FROM {{db}}.usage_adjustments FINAL WHERE {range}{team_where}
    GROUP BY event_id
) AS a ON e.event_id = a.event_id
)"""
# Unit price columns, one per dimension (schemas/prices.py DIMENSIONS), on events and adjustments alike.
UNIT_COLUMNS = tuple(f"unit_{d}" for d in DIMENSIONS)
# The effective cost of each dimension, `cost_<d>_usd` = the row's cost_<d> + its adjustments' delta_<d>: they
# add up to cost_usd (cost_total is the sum of the cost_ columns, delta_total of the deltas).
COST_COLUMNS = tuple(f"cost_{d}_usd" for d in DIMENSIONS)


def effective_sql(team: bool = False, ingested_before: bool = False) -> str:
    """A parenthesised subquery usable as `FROM <it> AS x`: one effective row per event in the range."""
    team_where = " AND team_id = {team:String}" if team else ""
    events_where = team_where + (
        " AND ingested_at <= {ingested_before:DateTime64(6, 'UTC')}" if ingested_before else ""
    )
    # An unmatched LEFT JOIN row has default values (n = 0, delta = 0), not NULLs (join_use_nulls is off).
    return _EFFECTIVE_SQL.format(statuses=BILLABLE_STATUSES_SQL, model=BILLED_MODEL_SQL, range=_RANGE,
                                 events_where=events_where, team_where=team_where, unit_cols=", ".join(UNIT_COLUMNS),
                                 units=", ".join(f"if(a.n > 0, a.{c}, e.{c}) AS {c}" for c in UNIT_COLUMNS),
                                 adj_units=", ".join(f"argMax({c}, seq) AS {c}" for c in UNIT_COLUMNS),
                                 cost_cols=", ".join(f"cost_{d}" for d in DIMENSIONS),
                                 adj_deltas=", ".join(f"sum(delta_{d}) AS delta_{d}" for d in DIMENSIONS),
                                 costs=", ".join(f"e.cost_{d} + a.delta_{d} AS cost_{d}_usd" for d in DIMENSIONS))  # fmt: skip


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """One component of one group: what an invoice usage line is made of, before rounding. `unit_usd_per_1m` is
    the component's unit price per `PER[component]` units: per 1M tokens for the token components (hence the
    name), per request for `request`, per 1,000 searches for `web_search`."""

    model: str
    price_version: str
    component: str
    unit_usd_per_1m: Decimal
    quantity: int
    requests: int
    price_tier: str = ""

    @property
    def exact_usd(self) -> Decimal:
        return Decimal(self.quantity) * self.unit_usd_per_1m / PER[self.component]


@dataclass(frozen=True, slots=True)
class LedgerGroup:
    """Billable usage of one model at one price version and one set of unit prices."""

    model: str
    price_version: str
    unit_input: Decimal
    unit_output: Decimal
    unit_cached_input: Decimal
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    price_tier: str = ""
    unit_cache_write: Decimal = ZERO
    unit_cache_write_1h: Decimal = ZERO
    unit_request: Decimal = ZERO
    unit_web_search: Decimal = ZERO
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    fee_requests: int = 0  # billable calls that had tokens: what the request fee is charged on
    web_searches: int = 0

    def quantity(self, component: str) -> int:
        return getattr(self, _QUANTITY[component])

    def unit(self, component: str) -> Decimal:
        return getattr(self, f"unit_{component}")

    def lines(self) -> list[LedgerLine]:
        return [LedgerLine(self.model, self.price_version, comp, self.unit(comp), self.quantity(comp), self.requests,
                           self.price_tier) for comp in COMPONENTS]  # fmt: skip

    @property
    def exact_usd(self) -> Decimal:
        return sum((line.exact_usd for line in self.lines()), ZERO)


# component -> the LedgerGroup field with its quantity
_QUANTITY = {"input": "input_tokens", "cached_input": "cached_tokens", "cache_write": "cache_write_tokens",
             "cache_write_1h": "cache_write_1h_tokens", "output": "output_tokens", "request": "fee_requests",
             "web_search": "web_searches"}  # fmt: skip
assert set(_QUANTITY) == set(COMPONENTS)


@dataclass(frozen=True, slots=True)
class TeamMonth:
    team_id: str
    period: str
    groups: list[LedgerGroup] = field(default_factory=list)
    unpriced: int = 0

    def lines(self) -> list[LedgerLine]:
        return [line for g in self.groups for line in g.lines()]

    @property
    def exact_usd(self) -> Decimal:
        return sum((g.exact_usd for g in self.groups), ZERO)

    def by_model(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = defaultdict(Decimal)
        for g in self.groups:
            out[g.model] += g.exact_usd
        return dict(out)


@dataclass(frozen=True, slots=True)
class MonthToDate:
    team_id: str
    key_id: str
    tokens: int  # prompt + completion tokens of billable-status calls, priced or not (token quotas need no price)
    usd: Decimal  # exact effective cost (events + adjustments)
    last_at: datetime | None
    unpriced: int


# What a group is keyed by (never merging two unit prices), and what it sums.
_GROUP_KEY = ("model", "price_version", "price_tier", *UNIT_COLUMNS)
_GROUP_SUMS = """count() AS requests, sum(input_tokens) AS input_qty, sum(cached_input_tokens) AS cached_qty,
       sum(cache_write_input_tokens) AS cache_write_qty, sum(cache_write_1h_input_tokens) AS cache_write_1h_qty,
       sum(output_tokens) AS output_qty, sum(fee_requests) AS request_qty, sum(web_searches) AS web_search_qty"""
_GROUPS_SQL = f"""
SELECT {{label}}{", ".join(_GROUP_KEY)}, {_GROUP_SUMS}
FROM {{effective}} AS x
WHERE billable
GROUP BY {{label_key}}{", ".join(_GROUP_KEY)}
ORDER BY {{label_key}}{", ".join(_GROUP_KEY)}
"""
_UNPRICED_SQL = "SELECT count() FROM {effective} AS x WHERE status IN ({statuses}) AND NOT priced"


def _group(r: dict) -> LedgerGroup:
    return LedgerGroup(
        r["model"], r["price_version"], Decimal(r["unit_input"]), Decimal(r["unit_output"]),
        Decimal(r["unit_cached_input"]), int(r["requests"]), int(r["input_qty"]), int(r["cached_qty"]),
        int(r["output_qty"]), r["price_tier"], Decimal(r["unit_cache_write"]), Decimal(r["unit_cache_write_1h"]),
        Decimal(r["unit_request"]), Decimal(r["unit_web_search"]), int(r["cache_write_qty"]),
        int(r["cache_write_1h_qty"]), int(r["request_qty"]), int(r["web_search_qty"]),
    )  # fmt: skip


def _params(start: datetime, end: datetime, team_id: str | None) -> dict[str, object]:
    return {"start": start, "end": end} | ({"team": team_id} if team_id is not None else {})


async def groups(store: Store, start: datetime, end: datetime, team_id: str | None = None,
                 ingested_before: datetime | None = None) -> tuple[list[LedgerGroup], int]:  # fmt: skip
    """Billable usage in [start, end) grouped by (model, price version, unit prices), and the unpriced count.
    `ingested_before`: only events ingested at or before it (what had arrived when an invoice was finalized)."""
    eff = effective_sql(team=team_id is not None, ingested_before=ingested_before is not None)
    params = _params(start, end, team_id)
    if ingested_before is not None:
        params["ingested_before"] = ingested_before
    rows = await store.query_dicts(_GROUPS_SQL.format(effective=eff, label="", label_key=""), parameters=params)
    unpriced = await store.query(_UNPRICED_SQL.format(effective=eff, statuses=BILLABLE_STATUSES_SQL), parameters=params)
    return [_group(r) for r in rows], int(unpriced[0][0]) if unpriced else 0


async def groups_by_label(store: Store, start: datetime, end: datetime, label_sql: str,
                          label_params: dict[str, object], team_id: str | None = None,
                          ingested_before: datetime | None = None) -> dict[str, list[LedgerGroup]]:  # fmt: skip
    """`groups`, split by `label_sql` (an expression over the effective row `x`, a fixed string; its inputs
    come as `label_params`): the same rows, so the labels' groups together are exactly `groups`'."""
    eff = effective_sql(team=team_id is not None, ingested_before=ingested_before is not None)
    params = _params(start, end, team_id) | label_params
    if ingested_before is not None:
        params["ingested_before"] = ingested_before
    sql = _GROUPS_SQL.format(effective=eff, label=f"{label_sql} AS label, ", label_key="label, ")
    out: dict[str, list[LedgerGroup]] = defaultdict(list)
    for r in await store.query_dicts(sql, parameters=params):
        out[r["label"]].append(_group(r))
    return dict(out)


_TEAM_GROUPS_SQL = f"""
SELECT team_id, {", ".join(_GROUP_KEY)}, billable, {_GROUP_SUMS}
FROM {{effective}} AS x
WHERE billable OR (status IN ({{statuses}}) AND NOT priced)
GROUP BY team_id, {", ".join(_GROUP_KEY)}, billable
ORDER BY team_id, {", ".join(_GROUP_KEY)}
"""


async def groups_by_team(store: Store, start: datetime, end: datetime,
                         team_id: str | None = None) -> dict[str, tuple[list[LedgerGroup], int]]:  # fmt: skip
    """`groups` for every team with usage in [start, end): {team_id: (groups, unpriced)}."""
    sql = _TEAM_GROUPS_SQL.format(effective=effective_sql(team=team_id is not None), statuses=BILLABLE_STATUSES_SQL)
    out: dict[str, tuple[list[LedgerGroup], int]] = {}
    for r in await store.query_dicts(sql, parameters=_params(start, end, team_id)):
        gs, unpriced = out.get(r["team_id"], ([], 0))
        if r["billable"]:
            gs.append(_group(r))
        else:
            unpriced += int(r["requests"])
        out[r["team_id"]] = (gs, unpriced)
    return out


async def team_month(store: Store, team_id: str, period: str, ingested_before: datetime | None = None) -> TeamMonth:
    """A team's billable usage of a UTC month, adjustments attached to the period of the event they correct."""
    start, end = bounds(period)
    gs, unpriced = await groups(store, start, end, team_id, ingested_before)
    return TeamMonth(team_id, period, gs, unpriced)


_MTD_SQL = """
SELECT team_id, key_id, sum({quota_tokens}) AS tokens,
       sumIf(cost_usd, billable) AS usd, max(occurred_at) AS last_at,
       countIf(status IN ({statuses}) AND NOT priced) AS unpriced
FROM {effective} AS x
GROUP BY team_id, key_id
"""


async def month_to_date(store: Store, period: str, ingested_before: datetime | None = None) -> list[MonthToDate]:
    """Per (team, key) totals of a period: the quota seed. `ingested_before` counts only events ingested
    at or before it (and their adjustments), so a stream consumer can count the rest itself."""
    start, end = bounds(period)
    params: dict[str, object] = {"start": start, "end": end}
    if ingested_before is not None:
        params["ingested_before"] = ingested_before
    sql = _MTD_SQL.format(
        statuses=BILLABLE_STATUSES_SQL,
        quota_tokens=QUOTA_TOKENS_SQL,
        effective=effective_sql(ingested_before=ingested_before is not None),
    )
    rows = await store.query_dicts(sql, parameters=params)
    return [
        MonthToDate(r["team_id"], r["key_id"], int(r["tokens"]), Decimal(r["usd"]),
                    None if r["last_at"] is None else utc(r["last_at"]), int(r["unpriced"]))
        for r in rows
    ]  # fmt: skip


def report_model(model: str, config: GatewayConfig) -> str:
    """The label a report shows for a stored model name: itself if the config knows it (a public name or
    an alias), else one bucket, so a caller's made-up names never become rows in staff views."""
    return model if model in config.models or config.resolve(model) is not None else UNKNOWN_MODEL
