"""The ledger's spend per budgeted end user and tag value (schemas/budgets.py), over the same effective rows as
every other total (ledger.effective_sql): the seed and convergence of budget quotas, and the daily spend seed.

Only teams that hold a budget are queried, and only entities with a budget are kept, so a team without
budgets costs nothing here and one with 100k end users but no default keeps only its budgeted ones.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from schemas.budgets import BudgetIndex, end_user_entity, tag_entity
from schemas.clickhouse import Store
from schemas.clock import utc
from schemas.quota import QUOTA_TOKENS_SQL
from services.billing.ledger import effective_sql
from services.billing.quota import Entity, Usage

_END_USER_SQL = """
SELECT team_id, end_user AS value, '' AS tag, sum({quota_tokens}) AS tokens, sumIf(cost_usd, billable) AS usd,
       max(occurred_at) AS last_at
FROM {effective} AS x
WHERE has({{teams:Array(String)}}, team_id) AND end_user != ''
GROUP BY team_id, end_user
"""
_TAG_SQL = """
SELECT team_id, v AS value, k AS tag, sum({quota_tokens}) AS tokens, sumIf(cost_usd, billable) AS usd,
       max(occurred_at) AS last_at
FROM {effective} AS x
ARRAY JOIN mapKeys(metadata) AS k, mapValues(metadata) AS v
WHERE has({{teams:Array(String)}}, team_id)
GROUP BY team_id, k, v
"""
_TEAM_SQL = "SELECT team_id, sumIf(cost_usd, billable) AS usd FROM {effective} AS x GROUP BY team_id"


def _params(start: datetime, end: datetime, ingested_before: datetime | None) -> dict[str, object]:
    params: dict[str, object] = {"start": start, "end": end}
    if ingested_before is not None:
        params["ingested_before"] = ingested_before
    return params


async def budget_spend(store: Store, index: BudgetIndex, start: datetime, end: datetime,
                       ingested_before: datetime | None = None) -> dict[Entity, Usage]:  # fmt: skip
    """Per budgeted entity: billable tokens and exact cost of events in [start, end) (ingested by the cutoff)."""
    teams = sorted(index.teams())
    out: dict[Entity, Usage] = {}
    if not teams:
        return out
    eff = effective_sql(ingested_before=ingested_before is not None)
    params = _params(start, end, ingested_before) | {"teams": teams}
    for scope, sql in (("end_user", _END_USER_SQL), ("tag", _TAG_SQL)):
        rows = await store.query_dicts(sql.format(quota_tokens=QUOTA_TOKENS_SQL, effective=eff), parameters=params)
        for r in rows:
            if scope == "end_user":
                entity: Entity = ("end_user", end_user_entity(r["team_id"], r["value"]))
            else:
                entity = ("tag", tag_entity(r["team_id"], r["tag"], r["value"]))
            if index.get(entity) is None:
                continue
            out[entity] = Usage(int(r["tokens"]), Decimal(r["usd"]), 0,
                                None if r["last_at"] is None else utc(r["last_at"]))  # fmt: skip
    return out


async def team_spend(store: Store, start: datetime, end: datetime,
                     ingested_before: datetime | None = None) -> dict[Entity, Decimal]:  # fmt: skip
    """Per team: exact cost of events in [start, end) (the daily alert's seed)."""
    eff = effective_sql(ingested_before=ingested_before is not None)
    rows = await store.query_dicts(_TEAM_SQL.format(effective=eff), parameters=_params(start, end, ingested_before))
    return {("team", r["team_id"]): Decimal(r["usd"]) for r in rows}
