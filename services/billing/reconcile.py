"""Reconciliation: can finance trust a period's numbers? (backs `GET /v1/reconcile` and `tollway reconcile`)

Per team and billed model:
  * metered: the ledger's exact amount (events FINAL + adjustments FINAL by event period), its events, the raw
    rows behind them (duplicates absorbed = raw - events, a lower bound: merges may have collapsed copies),
    unpriced events, re-rating adjustments, dead letters (outstanding = not since accepted, clock-skewed =
    refused for an occurred_at in the future);
  * rollups: `usage_hourly` (what dashboards read) against the ledger;
  * invoices: `billable_usd` = the ledger's lines each rounded once (the invoices' rule), against
    `invoiced_usd` = the period's finalized usage lines + every finalized adjustment line whose
    `adjusts.period` is this period (wherever it was carried), and `carried_usd` = adjustment lines for this
    period that the next open invoice's draft carries now. `invoice_state`:
      not_invoiced         no finalized invoice for the team-period yet: a state, never a difference;
      invoiced             invoiced == billable;
      adjustment_pending   invoiced + carried == billable: the next invoice brings it up to date;
      difference           anything else (`invoice_difference_usd` says how much).
Per proxy instance seen in the period: gaps in proxy_seq, judged over the instance's whole sequence (the
number is stamped when a call finishes, occurred_at when it starts, so a month's slice of the sequence has
holes at its edges that are not losses); a number that reached the dead-letter table is not a gap (the
event was refused with a reason, see dead letters). Holes before an instance's first stored number are not
visible. Gaps are per instance, not per team: a team-filtered report still shows every instance's gaps.

`ok` is true when `problems` is empty: no sequence gap, no outstanding dead letter, no unpriced event, every
rollup equal to the ledger, every invoiced team-model equal to the ledger (directly or with what is carried).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.clickhouse import Store
from schemas.control import TeamState
from schemas.money import cents, plain
from schemas.periods import bounds, checked_period, next_period
from services.billing import ledger
from services.billing.invoice_documents import Documents
from services.billing.invoices import Invoices

ZERO = Decimal(0)
_RANGE = "occurred_at >= {start:DateTime64(6, 'UTC')} AND occurred_at < {end:DateTime64(6, 'UTC')}"
_DEAD_RANGE = "dead_at >= {start:DateTime64(6, 'UTC')} AND dead_at < {end:DateTime64(6, 'UTC')}"

_METERED_SQL = """
SELECT x.team_id AS team_id, x.model AS model, count() AS events,
       countIf(x.status IN ({statuses}) AND NOT x.priced) AS unpriced,
       sumIf(x.cost_usd, x.billable) AS metered, sum(x.adjustment_count) AS adjustments,
       sumIf(x.adjustments_usd, x.billable) AS adjustments_usd
FROM {effective} AS x
GROUP BY team_id, model"""


def metered_sql(team: bool) -> str:
    statuses = ", ".join(f"'{s}'" for s in ledger.BILLABLE_STATUSES)
    return _METERED_SQL.format(statuses=statuses, effective=ledger.effective_sql(team=team))


RAW_SQL = f"""
SELECT team_id, {ledger.BILLED_MODEL_SQL} AS model, count() AS raw_rows
FROM {{db}}.usage_events WHERE {_RANGE} {{team_filter}} GROUP BY team_id, model"""
ROLLUP_SQL = """
SELECT team_id, model, sum(requests) AS requests, sum(cost + adjustments) AS cost
FROM {db}.usage_hourly FINAL
WHERE hour >= toStartOfHour({start:DateTime64(6, 'UTC')}) AND hour < {end:DateTime64(6, 'UTC')} {team_filter}
GROUP BY team_id, model"""
# A dead letter is outstanding until an event with its id is stored (a re-fed dead letter that was accepted).
DEAD_SQL = f"""
SELECT team_id, model, count() AS dead,
       countIf(event_id = '' OR event_id NOT IN (SELECT toString(event_id) FROM {{db}}.usage_events)) AS outstanding,
       countIf(positionCaseInsensitive(reason, 'in the future') > 0) AS clock_skewed
FROM {{db}}.usage_dead_letters FINAL
WHERE {_DEAD_RANGE} {{team_filter}}
GROUP BY team_id, model"""
INSTANCES_SQL = f"""
SELECT proxy_instance, count() AS events, min(proxy_seq) AS first_seq, max(proxy_seq) AS last_seq
FROM {{db}}.usage_events FINAL WHERE {_RANGE} AND proxy_seq > 0
GROUP BY proxy_instance ORDER BY proxy_instance"""
# The whole sequence of every instance seen in the period (events and dead letters), then the holes next to
# a number of this period. `at` is when the number's call started (a dead letter: when it was refused).
HOLES_SQL = f"""
SELECT proxy_instance, prev, proxy_seq
FROM (
    SELECT proxy_instance, proxy_seq, at, dead,
           lagInFrame(proxy_seq, 1, proxy_seq) OVER w AS prev, lagInFrame(at, 1, at) OVER w AS prev_at
    FROM (
        SELECT proxy_instance, proxy_seq, min(at) AS at, min(dead) AS dead
        FROM (
            SELECT proxy_instance, proxy_seq, occurred_at AS at, 0 AS dead FROM {{db}}.usage_events
            WHERE proxy_seq > 0 AND proxy_instance IN (SELECT proxy_instance FROM {{db}}.usage_events
                                                       WHERE {_RANGE} AND proxy_seq > 0)
            UNION ALL
            SELECT JSONExtractString(value, 'proxy_instance') AS proxy_instance,
                   JSONExtractUInt(value, 'proxy_seq') AS proxy_seq, dead_at AS at, 1 AS dead
            FROM {{db}}.usage_dead_letters
        )
        WHERE proxy_seq > 0
        GROUP BY proxy_instance, proxy_seq
    )
    WINDOW w AS (PARTITION BY proxy_instance ORDER BY proxy_seq ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
)
WHERE proxy_seq - prev > 1
  AND ((at >= {{start:DateTime64(6, 'UTC')}} AND at < {{end:DateTime64(6, 'UTC')}})
       OR (prev_at >= {{start:DateTime64(6, 'UTC')}} AND prev_at < {{end:DateTime64(6, 'UTC')}}))
ORDER BY proxy_instance, proxy_seq"""
DEAD_SEQ_SQL = f"""
SELECT JSONExtractString(value, 'proxy_instance') AS proxy_instance, count() AS dead_lettered
FROM {{db}}.usage_dead_letters FINAL WHERE {_DEAD_RANGE} AND JSONExtractUInt(value, 'proxy_seq') > 0
GROUP BY proxy_instance"""
MAX_HOLES = 20


def money(v: Decimal | None) -> str | None:
    return None if v is None else plain(v)


def _adjusts(line: dict[str, Any]) -> tuple[str | None, str | None]:
    """(period, model) an adjustment line adjusts, from the `adjusts` object invoices write."""
    a = line.get("adjusts") or {}
    return a.get("period"), a.get("model") or line.get("model")


def invoiced_amounts(period: str, finalized: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """(team, model) -> what finalized invoices bill for `period`: its own usage lines plus adjustment lines
    for it on any finalized invoice (adjustments of a closed period are carried to later invoices)."""
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for (team, inv_period), inv in finalized.items():
        for line in inv.get("lines", []):
            if line.get("type") == "usage" and inv_period == period:
                out[(team, line["model"])] += Decimal(line["amount_usd"])
            elif line.get("type") == "adjustment":
                adj_period, model = _adjusts(line)
                if adj_period == period and model is not None:
                    out[(team, model)] += Decimal(line["amount_usd"])
    return dict(out)


def carried_amounts(period: str, draft: dict[str, Any]) -> dict[str, Decimal]:
    """model -> adjustment lines for `period` on an open invoice's draft."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for line in draft.get("lines", []):
        if line.get("type") == "adjustment":
            adj_period, model = _adjusts(line)
            if adj_period == period and model is not None:
                out[model] += Decimal(line["amount_usd"])
    return dict(out)


def invoice_state(invoiced: Decimal | None, carried: Decimal, billable: Decimal) -> str:
    if invoiced is None:
        return "not_invoiced"
    if invoiced == billable:
        return "invoiced"
    if invoiced + carried == billable:
        return "adjustment_pending"
    return "difference"


def _blank() -> dict[str, Any]:
    return {"events": 0, "raw_rows": 0, "unpriced": 0, "dead_letters": 0, "dead_letters_outstanding": 0,
            "clock_skewed": 0, "adjustments": 0, "metered": ZERO, "adjustments_usd": ZERO, "billable": ZERO,
            "rollup_requests": 0, "rollup_usd": ZERO}  # fmt: skip


async def _finalized(store: Store, team_id: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    return await Documents(store).every(team_id)


async def _carried(invoices: Invoices, team: TeamState, period: str, fin_periods: set[str]) -> dict[str, Decimal]:
    target = next_period(period)
    while target in fin_periods:
        target = next_period(target)
    return carried_amounts(period, await invoices.draft(team, target))


async def reconcile_report(store: Store, period: str, team_id: str | None = None, *, invoices: Invoices | None = None,
                           teams: dict[str, TeamState] | None = None) -> dict[str, Any]:  # fmt: skip
    """The report for one UTC month. `invoices` computes the open drafts (what they carry); without it
    nothing counts as carried (`drafts_checked` false). `teams` gives the drafts their team (plan, name)."""
    period = checked_period(period)
    start, end = bounds(period)
    params: dict[str, Any] = {"start": start, "end": end}
    team_filter = ""
    if team_id is not None:
        team_filter, params["team"] = "AND team_id = {team:String}", team_id

    async def q(sql: str, p: dict[str, Any] = params) -> list[dict[str, Any]]:
        return await store.query_dicts(sql.replace("{team_filter}", team_filter), p)

    rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(_blank)
    for r in await q(metered_sql(team_id is not None)):
        rows[(r["team_id"], r["model"])].update(events=int(r["events"]), unpriced=int(r["unpriced"]),
                                                metered=Decimal(r["metered"]), adjustments=int(r["adjustments"]),
                                                adjustments_usd=Decimal(r["adjustments_usd"]))  # fmt: skip
    for r in await q(RAW_SQL):
        rows[(r["team_id"], r["model"])]["raw_rows"] = int(r["raw_rows"])
    for r in await q(ROLLUP_SQL):
        rows[(r["team_id"], r["model"])].update(rollup_requests=int(r["requests"]), rollup_usd=Decimal(r["cost"]))
    for r in await q(DEAD_SQL):
        rows[(r["team_id"], r["model"])].update(dead_letters=int(r["dead"]), clock_skewed=int(r["clock_skewed"]),
                                                dead_letters_outstanding=int(r["outstanding"]))  # fmt: skip
    for team, (groups, _) in (await ledger.groups_by_team(store, start, end, team_id)).items():
        for g in groups:
            rows[(team, g.model)]["billable"] += sum((cents(line.exact_usd) for line in g.lines()), ZERO)

    finalized = await _finalized(store, team_id)
    invoiced = invoiced_amounts(period, finalized)
    for key in invoiced:  # an invoiced team-model with nothing metered still gets its row
        rows.setdefault(key, _blank())
    invoiced_teams = {t for (t, p) in finalized if p == period}
    carried: dict[tuple[str, str], Decimal] = {}
    for team in sorted(invoiced_teams) if invoices is not None else ():
        state = (teams or {}).get(team) or TeamState(team_id=team, name=team)
        fin_periods = {p for (t, p) in finalized if t == team}
        for model, amount in (await _carried(invoices, state, period, fin_periods)).items():
            carried[(team, model)] = amount
            rows.setdefault((team, model), _blank())

    problems: list[dict[str, Any]] = []
    out_rows = []
    counts = ("events", "raw_rows", "duplicates_absorbed", "dead_letters", "dead_letters_outstanding", "clock_skewed",
              "unpriced", "adjustments")  # fmt: skip
    totals: dict[str, Any] = dict.fromkeys(counts, 0) | dict.fromkeys(("metered_usd", "rollup_usd", "billable_usd",
                                                                       "invoiced_usd", "carried_usd"), ZERO)  # fmt: skip
    for (team, model), r in sorted(rows.items()):
        rollup_diff = r["metered"] - r["rollup_usd"]
        inv = invoiced.get((team, model), ZERO) if team in invoiced_teams else None
        car = carried.get((team, model), ZERO)
        state = invoice_state(inv, car, r["billable"])
        inv_diff = r["billable"] - inv - car if inv is not None else None
        where = {"team_id": team, "model": model}
        if rollup_diff or r["rollup_requests"] != r["events"]:
            problems.append({"kind": "rollup_difference", **where, "difference_usd": money(rollup_diff),
                             "detail": "usage_hourly (dashboards) differs from the ledger; the meter's rollup pass "
                                       "recomputes touched hours"})  # fmt: skip
        if state == "difference":
            problems.append({"kind": "invoice_difference", **where, "difference_usd": money(inv_diff),
                             "detail": "finalized invoices plus what the next invoice carries differ from the ledger"})  # fmt: skip
        if r["unpriced"]:
            problems.append({"kind": "unpriced", **where, "events": r["unpriced"],
                             "detail": "billed zero until a price exists and `tollway rerate` prices them"})  # fmt: skip
        if r["dead_letters_outstanding"]:
            problems.append({"kind": "dead_letters", **where, "events": r["dead_letters_outstanding"],
                             "clock_skewed": r["clock_skewed"],
                             "detail": "refused by the meter and not accepted since (see usage_dead_letters.reason)"})  # fmt: skip
        out_rows.append({
            "team_id": team, "model": model, "events": r["events"], "raw_rows": r["raw_rows"],
            "duplicates_absorbed": max(0, r["raw_rows"] - r["events"]), "dead_letters": r["dead_letters"],
            "dead_letters_outstanding": r["dead_letters_outstanding"], "clock_skewed": r["clock_skewed"],
            "unpriced": r["unpriced"], "adjustments": r["adjustments"], "adjustments_usd": money(r["adjustments_usd"]),
            "metered_usd": money(r["metered"]), "rollup_requests": r["rollup_requests"],
            "rollup_usd": money(r["rollup_usd"]), "rollup_difference_usd": money(rollup_diff),
            "billable_usd": money(r["billable"]), "invoice_state": state, "invoiced_usd": money(inv),
            "carried_usd": money(car), "invoice_difference_usd": money(inv_diff),
        })  # fmt: skip
        for k in counts:
            if k != "duplicates_absorbed":
                totals[k] += r[k]
        totals["duplicates_absorbed"] += max(0, r["raw_rows"] - r["events"])
        totals["metered_usd"] += r["metered"]
        totals["rollup_usd"] += r["rollup_usd"]
        totals["billable_usd"] += r["billable"]
        totals["invoiced_usd"] += inv or ZERO
        totals["carried_usd"] += car

    sequences = await _sequences(store, start, end)
    for s in sequences:
        if s["gaps"]:
            problems.append({"kind": "sequence_gap", "proxy_instance": s["proxy_instance"], "events": s["gaps"],
                             "detail": "proxy_seq numbers neither stored nor dead-lettered: events lost"})  # fmt: skip
    gaps = sum(s["gaps"] for s in sequences)
    return {
        "period": period, "team_id": team_id, "ok": not problems, "problems": problems, "sequence_gaps": gaps,
        "totals": {**totals, **{k: money(totals[k]) for k in ("metered_usd", "rollup_usd", "billable_usd",
                                                             "invoiced_usd", "carried_usd")},
                   "rollup_difference_usd": money(totals["metered_usd"] - totals["rollup_usd"])},
        "rows": out_rows, "sequences": sequences, "invoices_checked": bool(invoiced_teams),
        "drafts_checked": invoices is not None,
        "rounding": "billable_usd: each ledger line (model, price version, unit price, component) rounded once to "
                    "0.01 USD, ROUND_HALF_EVEN, as on invoices; metered_usd is exact",
        "notes": "duplicates_absorbed is a lower bound: background merges may already have collapsed some copies",
    }  # fmt: skip


async def _sequences(store: Store, start: datetime, end: datetime) -> list[dict[str, Any]]:
    params = {"start": start, "end": end}
    holes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in await store.query_dicts(HOLES_SQL, params):
        holes[r["proxy_instance"]].append((int(r["prev"]) + 1, int(r["proxy_seq"]) - 1))
    dead = {r["proxy_instance"]: int(r["dead_lettered"]) for r in await store.query_dicts(DEAD_SEQ_SQL, params)}
    out = []
    for s in await store.query_dicts(INSTANCES_SQL, params):
        h = holes.get(s["proxy_instance"], [])
        out.append({"proxy_instance": s["proxy_instance"], "first_seq": int(s["first_seq"]),
                    "last_seq": int(s["last_seq"]), "events": int(s["events"]),
                    "dead_lettered": dead.get(s["proxy_instance"], 0), "gaps": sum(b - a + 1 for a, b in h),
                    "missing": [[a, b] for a, b in h[:MAX_HOLES]]})  # fmt: skip
    return out
