"""`GET /v1/reconcile?period=YYYY-MM[&team=]`: can finance trust the period's numbers? (staff only)

Per team and model: events (deduplicated), raw rows and the duplicates absorbed, dead letters, unpriced
events, metered amount (events FINAL + adjustments FINAL) against the rollups and, when a finalized invoice
exists, against its usage; per proxy instance: proxy_seq gaps (lost events). `ok` means no gap and every
difference zero. The same function backs `tollway reconcile`. All reads are FINAL: dedup-aware.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request

from schemas.clickhouse import Store
from services.billing.auth import Caller, staff_caller
from services.billing.periods import bounds, parse_period

router = APIRouter(tags=["reconcile"])

_RANGE = "occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}"
_MODEL = "if(served_model = '', requested_model, served_model)"

EVENTS_SQL = f"""
SELECT team_id, {_MODEL} AS model, count() AS events, countIf(NOT priced) AS unpriced, sum(cost_total) AS cost
FROM {{db}}.usage_events FINAL WHERE {_RANGE} {{team_filter}} GROUP BY team_id, model"""
RAW_SQL = f"""
SELECT team_id, {_MODEL} AS model, count() AS raw_rows
FROM {{db}}.usage_events WHERE {_RANGE} {{team_filter}} GROUP BY team_id, model"""
ADJ_SQL = f"""
SELECT team_id, model, sum(delta_total) AS adjustments, count() AS n
FROM {{db}}.usage_adjustments FINAL WHERE {_RANGE} {{team_filter}} GROUP BY team_id, model"""
ROLLUP_SQL = """
SELECT team_id, model, sum(requests) AS requests, sum(cost + adjustments) AS cost
FROM {db}.usage_hourly FINAL
WHERE hour >= toStartOfHour({start:DateTime64(3, 'UTC')}) AND hour < {end:DateTime64(3, 'UTC')} {team_filter}
GROUP BY team_id, model"""
DEAD_SQL = """
SELECT team_id, model, count() AS dead
FROM {db}.usage_dead_letters FINAL
WHERE dead_at >= {start:DateTime64(3, 'UTC')} AND dead_at < {end:DateTime64(3, 'UTC')} {team_filter}
GROUP BY team_id, model"""
# Sequence numbers are per proxy instance, not per team: gaps are reported per instance for the whole period.
SEQ_SQL = f"""
SELECT proxy_instance, min(proxy_seq) AS first_seq, max(proxy_seq) AS last_seq, count() AS events,
       toUInt64(max(proxy_seq) - min(proxy_seq) + 1 - count()) AS gaps,
       arraySlice(arrayFilter(x -> x.2 - x.1 > 1, groupArray((prev, proxy_seq))), 1, 20) AS holes
FROM (
    SELECT proxy_instance, proxy_seq,
           lagInFrame(proxy_seq, 1, toUInt64(proxy_seq - 1)) OVER (PARTITION BY proxy_instance ORDER BY proxy_seq
               ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS prev
    FROM (SELECT DISTINCT proxy_instance, proxy_seq FROM {{db}}.usage_events FINAL
          WHERE {_RANGE} AND proxy_seq > 0)
)
GROUP BY proxy_instance ORDER BY proxy_instance"""


def _money(v: Decimal | None) -> str | None:
    if v is None:
        return None
    return format(v.normalize(), "f") if v else "0"


async def _invoiced(store: Store, period: str, team_id: str | None) -> dict[tuple[str, str], Decimal] | None:
    """Exact usage amounts per (team, model) on finalized invoices for the period; None if billing has none."""
    if not (await store.query("EXISTS TABLE {db}.invoices"))[0][0]:
        return None
    rows = await store.query("SELECT team_id, period, content FROM {db}.invoices FINAL")
    if not rows:
        return None
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for team, inv_period, content in rows:
        if team_id is not None and team != team_id:
            continue
        inv = orjson.loads(content)
        for line in inv.get("lines", []):
            if line.get("type") == "usage" and inv_period == period:
                out[(team, line["model"])] += Decimal(line.get("exact_amount_usd") or line["amount_usd"])
            elif line.get("type") == "adjustment" and line.get("adjusts_period") == period:
                out[(team, line["model"])] += Decimal(line["amount_usd"])
    return out


async def reconcile_report(store: Store, period: str, team_id: str | None = None) -> dict[str, Any]:
    start, end = bounds(parse_period(period, datetime.now(UTC)))
    params: dict[str, Any] = {"start": start, "end": end}
    team_filter = ""
    if team_id is not None:
        team_filter, params["team"] = "AND team_id = {team:String}", team_id

    async def q(sql: str) -> list[dict[str, Any]]:
        return await store.query_dicts(sql.replace("{team_filter}", team_filter), params)

    rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"events": 0, "raw_rows": 0, "unpriced": 0, "dead_letters": 0, "adjustments": 0,
                 "cost": Decimal(0), "adjustments_usd": Decimal(0), "rollup_requests": 0, "rollup_usd": Decimal(0)}
    )  # fmt: skip
    for r in await q(EVENTS_SQL):
        rows[(r["team_id"], r["model"])].update(events=r["events"], unpriced=r["unpriced"], cost=r["cost"])
    for r in await q(RAW_SQL):
        rows[(r["team_id"], r["model"])]["raw_rows"] = r["raw_rows"]
    for r in await q(ADJ_SQL):
        rows[(r["team_id"], r["model"])].update(adjustments_usd=r["adjustments"], adjustments=r["n"])
    for r in await q(ROLLUP_SQL):
        rows[(r["team_id"], r["model"])].update(rollup_requests=r["requests"], rollup_usd=r["cost"])
    for r in await q(DEAD_SQL):
        rows[(r["team_id"], r["model"])]["dead_letters"] = r["dead"]
    invoiced = await _invoiced(store, period, team_id)
    seq = await store.query_dicts(SEQ_SQL, {"start": start, "end": end})

    out_rows = []
    ok = True
    totals: dict[str, Any] = defaultdict(int) | {"metered_usd": Decimal(0), "rollup_usd": Decimal(0)}
    for (team, model), r in sorted(rows.items()):
        metered = r["cost"] + r["adjustments_usd"]
        rollup_diff = metered - r["rollup_usd"]
        inv = invoiced.get((team, model), Decimal(0)) if invoiced is not None else None
        inv_diff = metered - inv if inv is not None else None
        ok = ok and rollup_diff == 0 and r["rollup_requests"] == r["events"] and not inv_diff
        out_rows.append({
            "team_id": team, "model": model, "events": r["events"], "raw_rows": r["raw_rows"],
            "duplicates_absorbed": max(0, r["raw_rows"] - r["events"]), "dead_letters": r["dead_letters"],
            "unpriced": r["unpriced"], "adjustments": r["adjustments"], "adjustments_usd": _money(r["adjustments_usd"]),
            "metered_usd": _money(metered), "rollup_requests": r["rollup_requests"], "rollup_usd": _money(r["rollup_usd"]),
            "rollup_difference_usd": _money(rollup_diff), "invoiced_usd": _money(inv),
            "invoice_difference_usd": _money(inv_diff),
        })  # fmt: skip
        for k in ("events", "raw_rows", "dead_letters", "unpriced", "adjustments"):
            totals[k] += r[k]
        totals["duplicates_absorbed"] += max(0, r["raw_rows"] - r["events"])
        totals["metered_usd"] += metered
        totals["rollup_usd"] += r["rollup_usd"]
    sequences = [{"proxy_instance": s["proxy_instance"], "first_seq": s["first_seq"], "last_seq": s["last_seq"],
                  "events": s["events"], "gaps": s["gaps"],
                  "missing": [[int(a) + 1, int(b) - 1] for a, b in s["holes"]]} for s in seq]  # fmt: skip
    gaps = sum(s["gaps"] for s in sequences)
    return {
        "period": period, "team_id": team_id, "ok": ok and gaps == 0, "sequence_gaps": gaps,
        "totals": {**totals, "metered_usd": _money(totals["metered_usd"]), "rollup_usd": _money(totals["rollup_usd"]),
                   "rollup_difference_usd": _money(totals["metered_usd"] - totals["rollup_usd"])},
        "rows": out_rows, "sequences": sequences, "invoices_checked": invoiced is not None,
        "notes": "duplicates_absorbed is a lower bound: background merges may already have collapsed some copies",
    }  # fmt: skip


@router.get("/v1/reconcile")
async def get_reconcile(request: Request, period: str = Query(...), team: str | None = None,
                        caller: Caller = Depends(staff_caller)) -> dict[str, Any]:  # fmt: skip
    team_id = None
    if team is not None:
        found = request.app.state.accounts.find_team(team)
        team_id = found.team_id if found is not None else team
    return await reconcile_report(request.app.state.store, period, team_id)
