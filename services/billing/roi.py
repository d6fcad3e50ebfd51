"""ROI per team and period: what the gateway's traffic cost against what the same tokens would have cost
at baseline prices, and where the difference came from (pure arithmetic + one grouped query).

For each group of rows (day, requested model, served model, status, stored unit prices):
  actual       = stored cost (cache hits and rejections cost 0);
  own          = the tokens at the served model's stored unit prices (for a cache hit: the avoided cost);
  requested    = the tokens at the requested model's price that day (= own unless routing changed the model);
  baseline     = the tokens at the requested model's `baseline` price (a model without one: its own price).
savings = baseline - actual, split exactly into
  cache     = own of cache hits,
  routing   = requested - own of calls served by another model than requested (fallback/routing),
  model     = baseline - requested (choosing a model cheaper than the baseline).
Money is Decimal throughout; the report rounds each figure to cents (ROUND_HALF_EVEN) for display.
"""

from __future__ import annotations

import calendar
import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from schemas.clickhouse import Store
from schemas.config import GatewayConfig, Price
from schemas.prices import MILLION, PriceBook, UnitPrice
from services.billing.periods import bounds, iso, period_of

ZERO = Decimal(0)
CENT = Decimal("0.01")

ROI_SQL = """
SELECT toDate(occurred_at, 'UTC') AS day, requested_model, served_model, provider, status,
       unit_input, unit_output, unit_cached_input, count() AS requests,
       sum(prompt_tokens - least(cached_tokens, prompt_tokens)) AS input_qty,
       sum(least(cached_tokens, prompt_tokens)) AS cached_qty,
       sum(completion_tokens) AS output_qty,
       sum(cost_total) AS cost
FROM {db}.usage_events FINAL
WHERE team_id = {team:String} AND status IN ('ok', 'error', 'cached') AND priced
  AND occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}
GROUP BY day, requested_model, served_model, provider, status, unit_input, unit_output, unit_cached_input
"""


@dataclass(frozen=True, slots=True)
class RoiRow:
    day: date
    requested_model: str
    served_model: str
    provider: str
    status: str
    unit: UnitPrice
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost: Decimal


def _at(unit: UnitPrice | Price, inp: int, cached: int, out: int) -> Decimal:
    cached_price = unit.cached_input if unit.cached_input is not None else unit.input
    return (Decimal(inp) * unit.input + Decimal(cached) * cached_price + Decimal(out) * unit.output) / MILLION


def money(v: Decimal) -> str:
    return str(v.quantize(CENT, rounding=ROUND_HALF_EVEN))


def _pct(part: Decimal, whole: Decimal) -> str:
    return str((part * 100 / whole).quantize(CENT, rounding=ROUND_HALF_EVEN)) if whole else "0.00"


def compute(rows: list[RoiRow], config: GatewayConfig, team_id: str, period: str, now: datetime) -> dict[str, Any]:
    book = PriceBook(config)
    totals = dict.fromkeys(("actual", "baseline", "cache", "routing", "model"), ZERO)
    per_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        served = r.served_model or r.requested_model
        requested = config.resolve(r.requested_model) or served
        when = datetime(r.day.year, r.day.month, r.day.day, tzinfo=UTC)
        toks = (r.input_tokens, r.cached_tokens, r.output_tokens)
        own = _at(r.unit, *toks)
        actual = ZERO if r.status == "cached" else r.cost
        req_unit = book.at(requested, "*", when) if requested != served else None
        req_cost = _at(req_unit, *toks) if req_unit is not None else own
        base_price = config.models[requested].baseline if requested in config.models else None
        baseline = _at(base_price, *toks) if base_price is not None else req_cost
        cache = own if r.status == "cached" else ZERO
        routing = req_cost - own if requested != served else ZERO
        model = baseline - req_cost
        for k, v in (("actual", actual), ("baseline", baseline), ("cache", cache), ("routing", routing),
                     ("model", model)):  # fmt: skip
            totals[k] += v
        m = per_model.setdefault(served, {"requests": 0, "cache_hits": 0, "prompt_tokens": 0, "cached_tokens": 0,
                                          "completion_tokens": 0, "actual": ZERO, "baseline": ZERO, "cache": ZERO,
                                          "routing": ZERO})  # fmt: skip
        m["requests"] += r.requests
        m["cache_hits"] += r.requests if r.status == "cached" else 0
        m["prompt_tokens"] += r.input_tokens + r.cached_tokens
        m["cached_tokens"] += r.cached_tokens
        m["completion_tokens"] += r.output_tokens
        for k, v in (("actual", actual), ("baseline", baseline), ("cache", cache), ("routing", routing)):
            m[k] += v
    start, end = bounds(period)
    current = period == period_of(now)
    days_in_period = Decimal(calendar.monthrange(start.year, start.month)[1])
    covered = Decimal(max((now - start).total_seconds(), 3600.0)) / Decimal(86400) if current else days_in_period
    savings = totals["baseline"] - totals["actual"]
    annual = savings / covered * Decimal(365)
    return {
        "object": "roi_report", "team_id": team_id, "period": period, "period_start": iso(start),
        "period_end": iso(end), "currency": "USD", "partial_period": current,
        "actual_cost_usd": money(totals["actual"]), "baseline_cost_usd": money(totals["baseline"]),
        "savings_usd": money(savings), "savings_pct": _pct(savings, totals["baseline"]),
        "savings_breakdown_usd": {"cache": money(totals["cache"]), "routing": money(totals["routing"]),
                                  "model_choice": money(totals["model"])},
        "annualised_savings_usd": money(annual),
        "annualised_basis": f"savings per day over {covered.quantize(CENT)} days x 365",
        "models": [
            {"model": name, "requests": m["requests"], "cache_hits": m["cache_hits"],
             "prompt_tokens": m["prompt_tokens"], "cached_tokens": m["cached_tokens"],
             "completion_tokens": m["completion_tokens"], "actual_cost_usd": money(m["actual"]),
             "baseline_cost_usd": money(m["baseline"]), "savings_usd": money(m["baseline"] - m["actual"]),
             "savings_pct": _pct(m["baseline"] - m["actual"], m["baseline"]),
             "cache_savings_usd": money(m["cache"]), "routing_savings_usd": money(m["routing"])}
            for name, m in sorted(per_model.items())
        ],
        "method": "baseline = tokens at the requested model's baseline price (its own price when it has none)",
    }  # fmt: skip


async def roi_report(store: Store, config: GatewayConfig, team_id: str, period: str) -> dict[str, Any]:
    start, end = bounds(period)
    raw = await store.query_dicts(ROI_SQL, parameters={"team": team_id, "start": start, "end": end})
    rows = [
        RoiRow(r["day"], r["requested_model"], r["served_model"], r["provider"], r["status"],
               UnitPrice("stored", Decimal(r["unit_input"]), Decimal(r["unit_output"]), Decimal(r["unit_cached_input"])),
               int(r["requests"]), int(r["input_qty"]), int(r["cached_qty"]), int(r["output_qty"]),
               Decimal(r["cost"]))
        for r in raw
    ]  # fmt: skip
    return compute(rows, config, team_id, period, datetime.now(UTC))


ROI_CSV_COLUMNS = ("team_id", "period", "model", "requests", "cache_hits", "prompt_tokens", "cached_tokens",
                   "completion_tokens", "actual_cost_usd", "baseline_cost_usd", "savings_usd", "savings_pct",
                   "cache_savings_usd", "routing_savings_usd")  # fmt: skip


def roi_csv(report: dict[str, Any]) -> str:
    """One row per model, then a TOTAL row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ROI_CSV_COLUMNS)
    for m in report["models"]:
        w.writerow([report["team_id"], report["period"], *(m[c] for c in ROI_CSV_COLUMNS[2:])])
    b = report["savings_breakdown_usd"]
    w.writerow([report["team_id"], report["period"], "TOTAL", sum(m["requests"] for m in report["models"]),
                sum(m["cache_hits"] for m in report["models"]), sum(m["prompt_tokens"] for m in report["models"]),
                sum(m["cached_tokens"] for m in report["models"]),
                sum(m["completion_tokens"] for m in report["models"]), report["actual_cost_usd"],
                report["baseline_cost_usd"], report["savings_usd"], report["savings_pct"], b["cache"], b["routing"]])  # fmt: skip
    return buf.getvalue()
