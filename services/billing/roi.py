"""ROI per team and period: what the gateway's traffic cost against what the same tokens would have cost
at baseline prices, and where the difference came from (pure arithmetic + one grouped ledger query).

Rows come from the ledger's effective rows (events FINAL + re-rating adjustments FINAL), so `actual` of a
team-month is the ledger's exact amount. For each group (day, requested model, served model, status,
effective unit prices):
  actual       = effective cost (cache hits and rejections cost 0);
  own          = the quantities (every price dimension: schemas/prices.py) at the served model's effective unit
                 prices (for a cache hit: the avoided cost, at the price in force that day in the current book,
                 since a re-rate moves no money on a hit and so leaves its stored unit prices behind);
  requested    = the tokens at the requested model's price that day (= own unless routing changed the model);
  baseline     = the tokens at the requested model's `baseline` price in force that day (effective-dated like
                 prices; a model without one in force: its own price). A baseline is a Price: its cache
                 writes, fees, service tiers and long-context rates apply as they would to a price (groups
                 are split by service tier and by which long-context thresholds the prompts cross).
savings = baseline - actual, split into
  cache     = own of cache hits,
  routing   = requested - own of calls served by another model than requested (fallback/routing),
  model     = baseline - requested (choosing a model cheaper than the baseline).

Rounding rule (the invoices' rule, stated once in `ROUNDING_RULE`): each report row (one model) is computed
exactly in Decimal, then each of its figures is rounded ONCE to cents (ROUND_HALF_EVEN); a row's savings =
its rounded baseline - its rounded actual, its model-choice part = its savings - cache - routing (so the
row foots); every total is the plain sum of the rounded rows, so the CSV TOTAL row is the sum of its rows.
Percentages are not money: they come from the exact figures.
The exact amounts are given too (`actual_cost_exact_usd`, `baseline_cost_exact_usd`).
Annualised savings need at least `MIN_ANNUALISE_DAYS` days of the period behind them; under that the figure
is null and `annualised_basis` says why.
"""

from __future__ import annotations

import calendar
import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from schemas.billed import billed_model
from schemas.clickhouse import Store
from schemas.clock import iso
from schemas.config import GatewayConfig
from schemas.money import CENT, cents, plain, usd
from schemas.periods import bounds, period_of
from schemas.prices import PriceBook, Quantities, UnitPrice, catalog, cost_at, price_set
from services.billing import ledger

ZERO = Decimal(0)
MIN_ANNUALISE_DAYS = 7
ROUNDING_RULE = ("each model row: exact Decimal figures rounded once to 0.01 USD (ROUND_HALF_EVEN), savings = "
                 "rounded baseline - rounded actual; totals = sums of the rounded rows")  # fmt: skip

# Every long-context threshold of the config (prices, route prices, baselines): a group's `over` counts those its
# calls' prompts exceed, so the rates at any of these prices are the same for every call of the group.
ROI_SQL = f"""
SELECT toDate(x.occurred_at, 'UTC') AS day, x.requested_model AS requested_model, x.model AS billed_model,
       x.provider AS provider, x.status AS status, x.service_tier AS service_tier,
       arrayCount(t -> x.prompt_tokens > t, {{thresholds:Array(UInt64)}}) AS over,
       {", ".join(f"x.{c} AS {c}" for c in ledger.UNIT_COLUMNS)}, count() AS requests,
       sum(x.input_tokens) AS input_qty, sum(x.cached_input_tokens) AS cached_qty, sum(x.output_tokens) AS output_qty,
       sum(x.cache_write_input_tokens) AS cache_write_qty, sum(x.cache_write_1h_input_tokens) AS cache_write_1h_qty,
       sum(x.fee_requests) AS request_qty, sum(x.web_searches) AS web_search_qty, sum(x.cost_usd) AS cost
FROM {ledger.effective_sql(team=True)} AS x
WHERE (x.billable OR x.status = 'cached') AND x.priced
GROUP BY day, requested_model, billed_model, provider, status, service_tier, over, {", ".join(ledger.UNIT_COLUMNS)}
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
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    fee_requests: int = 0  # calls with tokens: the request fee's quantity
    web_searches: int = 0
    service_tier: str = ""
    prompt_tokens: int = 0  # a prompt size that crosses exactly the long-context thresholds the group's calls do

    def quantities(self) -> Quantities:
        return Quantities(self.input_tokens, self.cached_tokens, self.cache_write_tokens, self.cache_write_1h_tokens,
                          self.output_tokens, self.fee_requests, self.web_searches)  # fmt: skip


def _at(unit: UnitPrice, r: RoiRow) -> Decimal:
    return cost_at(unit, r.quantities()).total


def thresholds(config: GatewayConfig) -> list[int]:
    """Every long-context threshold a price or baseline of the config has, ascending."""
    found = {e.prices.long_context[0] for e in catalog(config) if e.prices.long_context is not None}
    found |= {p.long_context.above_prompt_tokens for m in config.models.values() for p in m.baseline or ()
              if p.long_context is not None}  # fmt: skip
    return sorted(found)


def _pct(part: Decimal, whole: Decimal) -> str:
    return str(cents(part * 100 / whole)) if whole else "0.00"  # to the hundredth, as money is


def _annualised(savings: Decimal, covered_days: Decimal) -> tuple[str | None, str]:
    shown = covered_days.quantize(CENT)
    if covered_days < MIN_ANNUALISE_DAYS:
        return None, (f"not annualised: {shown} days of data, under the {MIN_ANNUALISE_DAYS}-day minimum "
                      "(a few hours or days of traffic do not predict a year)")  # fmt: skip
    return usd(savings / covered_days * Decimal(365)), f"savings per day over {shown} days x 365"


def compute(rows: list[RoiRow], config: GatewayConfig, team_id: str, period: str, now: datetime) -> dict[str, Any]:
    book = PriceBook(config)
    exact = dict.fromkeys(("actual", "baseline"), ZERO)
    per_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        served = billed_model(r.served_model, r.requested_model)
        requested = config.resolve(r.requested_model) or served
        when = datetime(r.day.year, r.day.month, r.day.day, tzinfo=UTC)
        own = _at(r.unit, r)
        if r.status == "cached":
            # A cache hit costs nothing, so `tollway rerate` moves no money on it and leaves its stored unit prices
            # as they were; what it avoided is the call at the price the book has for its day now (the price a
            # billed twin was re-rated to), or the cache's savings and the baseline would keep a superseded price.
            now_entry = book.at(served, r.provider, when)
            if now_entry is not None:
                own = _at(now_entry.select(r.service_tier, r.prompt_tokens), r)
        actual = ZERO if r.status == "cached" else r.cost
        req_entry = book.at(requested, "*", when) if requested != served else None
        req_cost = _at(req_entry.select(r.service_tier, r.prompt_tokens), r) if req_entry is not None else own
        base_price = config.models[requested].baseline_at(r.day) if requested in config.models else None
        # A baseline is a Price like any other: the same dimensions, tiers and long-context rates.
        baseline = (_at(price_set(requested, "baseline", base_price).select(r.service_tier, r.prompt_tokens), r)
                    if base_price is not None else req_cost)  # fmt: skip
        cache = own if r.status == "cached" else ZERO
        routing = req_cost - own if requested != served else ZERO
        exact["actual"] += actual
        exact["baseline"] += baseline
        m = per_model.setdefault(ledger.report_model(served, config), {
            "requests": 0, "cache_hits": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
            "actual": ZERO, "baseline": ZERO, "cache": ZERO, "routing": ZERO})  # fmt: skip
        m["requests"] += r.requests
        m["cache_hits"] += r.requests if r.status == "cached" else 0
        m["prompt_tokens"] += r.input_tokens + r.cached_tokens + r.cache_write_tokens + r.cache_write_1h_tokens
        m["cached_tokens"] += r.cached_tokens
        m["completion_tokens"] += r.output_tokens
        for k, v in (("actual", actual), ("baseline", baseline), ("cache", cache), ("routing", routing)):
            m[k] += v
    models = []
    for name, m in sorted(per_model.items()):
        actual_r, baseline_r, cache_r, routing_r = (cents(m[k]) for k in ("actual", "baseline", "cache", "routing"))
        savings_r = baseline_r - actual_r
        models.append({
            "model": name, "requests": m["requests"], "cache_hits": m["cache_hits"],
            "prompt_tokens": m["prompt_tokens"], "cached_tokens": m["cached_tokens"],
            "completion_tokens": m["completion_tokens"], "actual_cost_usd": usd(actual_r),
            "baseline_cost_usd": usd(baseline_r), "savings_usd": usd(savings_r),
            "savings_pct": _pct(m["baseline"] - m["actual"], m["baseline"]), "cache_savings_usd": usd(cache_r),
            "routing_savings_usd": usd(routing_r), "model_choice_savings_usd": usd(savings_r - cache_r - routing_r),
        })  # fmt: skip

    def total(field: str) -> Decimal:
        return sum((Decimal(m[field]) for m in models), ZERO)

    start, end = bounds(period)
    current = period == period_of(now)
    days_in_period = Decimal(calendar.monthrange(start.year, start.month)[1])
    covered = Decimal(max((now - start).total_seconds(), 0.0)) / Decimal(86400) if current else days_in_period
    savings = total("savings_usd")
    annual, basis = _annualised(savings, covered)
    return {
        "object": "roi_report", "team_id": team_id, "period": period, "period_start": iso(start),
        "period_end": iso(end), "currency": "USD", "partial_period": current,
        "actual_cost_usd": usd(total("actual_cost_usd")), "baseline_cost_usd": usd(total("baseline_cost_usd")),
        "savings_usd": usd(savings), "savings_pct": _pct(exact["baseline"] - exact["actual"], exact["baseline"]),
        "savings_breakdown_usd": {"cache": usd(total("cache_savings_usd")),
                                  "routing": usd(total("routing_savings_usd")),
                                  "model_choice": usd(total("model_choice_savings_usd"))},
        "actual_cost_exact_usd": plain(exact["actual"]), "baseline_cost_exact_usd": plain(exact["baseline"]),
        "annualised_savings_usd": annual, "annualised_basis": basis, "rounding": ROUNDING_RULE,
        "models": models,
        "method": "baseline = tokens at the requested model's baseline price in force that day (its own price "
                  "when it has none)",
    }  # fmt: skip


async def roi_report(store: Store, config: GatewayConfig, team_id: str, period: str) -> dict[str, Any]:
    start, end = bounds(period)
    limits = thresholds(config)
    raw = await store.query_dicts(ROI_SQL, parameters={"team": team_id, "start": start, "end": end,
                                                       "thresholds": limits})  # fmt: skip
    rows = [
        RoiRow(r["day"], r["requested_model"], r["billed_model"], r["provider"], r["status"],
               UnitPrice("stored", *(Decimal(r[f"unit_{d}"]) for d in _UNIT_ORDER)), int(r["requests"]),
               int(r["input_qty"]), int(r["cached_qty"]), int(r["output_qty"]), Decimal(r["cost"]),
               int(r["cache_write_qty"]), int(r["cache_write_1h_qty"]), int(r["request_qty"]),
               int(r["web_search_qty"]), r["service_tier"], limits[r["over"] - 1] + 1 if r["over"] else 0)
        for r in raw
    ]  # fmt: skip
    return compute(rows, config, team_id, period, datetime.now(UTC))


# UnitPrice's fields after its version, in order
_UNIT_ORDER = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "request", "web_search")


ROI_CSV_COLUMNS = ("team_id", "period", "model", "requests", "cache_hits", "prompt_tokens", "cached_tokens",
                   "completion_tokens", "actual_cost_usd", "baseline_cost_usd", "savings_usd", "savings_pct",
                   "cache_savings_usd", "routing_savings_usd", "model_choice_savings_usd")  # fmt: skip


def roi_csv(report: dict[str, Any]) -> str:
    """One row per model, then a TOTAL row: the report's totals, which are the sums of the rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ROI_CSV_COLUMNS)
    for m in report["models"]:
        w.writerow([report["team_id"], report["period"], *(m[c] for c in ROI_CSV_COLUMNS[2:])])
    b = report["savings_breakdown_usd"]
    counts = [sum(m[c] for m in report["models"]) for c in ROI_CSV_COLUMNS[3:8]]
    w.writerow([report["team_id"], report["period"], "TOTAL", *counts, report["actual_cost_usd"],
                report["baseline_cost_usd"], report["savings_usd"], report["savings_pct"], b["cache"], b["routing"],
                b["model_choice"]])  # fmt: skip
    return buf.getvalue()
