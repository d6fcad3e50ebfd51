"""ROI arithmetic (pure): the report foots under one rounding rule, baselines are effective-dated like
prices, and a few days of traffic are never annualised."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal

from schemas.config import GatewayConfig, load_config
from schemas.prices import UnitPrice
from services.billing.roi import MIN_ANNUALISE_DAYS, RoiRow, compute, roi_csv

CONFIG = load_config("tollway.yaml")
NOW = datetime(2026, 12, 2, tzinfo=UTC)
MINI = UnitPrice("v", Decimal("0.40"), Decimal("1.60"), Decimal("0.10"))
GPT = UnitPrice("v", Decimal("2.00"), Decimal("8.00"), Decimal("0.50"))


def row(day: int, model: str, unit: UnitPrice, inp: int, out: int, month: int = 10) -> RoiRow:
    cost = (Decimal(inp) * unit.input + Decimal(out) * unit.output) / 1_000_000
    return RoiRow(date(2026, month, day), model, model, "openai", "ok", unit, 1, inp, 0, out, cost)


def test_roi_totals_and_csv_total_row_are_the_sums_of_the_rounded_rows() -> None:
    # Each model's actual cost is 0.6 of a cent: each row rounds to 0.01, their exact sum (1.2 cents) to 0.01.
    rows = [row(3, "gpt-4.1", GPT, 3_000, 0), row(3, "gpt-4.1-mini", MINI, 15_000, 0)]
    r = compute(rows, CONFIG, "team_x", "2026-10", NOW)
    models = r["models"]
    for field in ("actual_cost_usd", "baseline_cost_usd", "savings_usd"):
        assert Decimal(r[field]) == sum(Decimal(m[field]) for m in models), field
    for part, field in (("cache", "cache_savings_usd"), ("routing", "routing_savings_usd"),
                        ("model_choice", "model_choice_savings_usd")):  # fmt: skip
        assert Decimal(r["savings_breakdown_usd"][part]) == sum(Decimal(m[field]) for m in models), part
    for m in models:  # a row foots: savings = baseline - actual = cache + routing + model choice
        assert Decimal(m["savings_usd"]) == Decimal(m["baseline_cost_usd"]) - Decimal(m["actual_cost_usd"])
        assert Decimal(m["savings_usd"]) == sum(
            Decimal(m[f]) for f in ("cache_savings_usd", "routing_savings_usd", "model_choice_savings_usd")
        )
    assert r["actual_cost_usd"] == "0.02" and Decimal(r["actual_cost_exact_usd"]) == Decimal("0.012")
    table = list(csv.DictReader(io.StringIO(roi_csv(r))))
    total = table[-1]
    assert total["model"] == "TOTAL"
    for col in ("actual_cost_usd", "baseline_cost_usd", "savings_usd", "cache_savings_usd", "routing_savings_usd"):
        assert Decimal(total[col]) == sum(Decimal(t[col]) for t in table[:-1]), col


def with_baseline(baseline: object) -> GatewayConfig:
    data = CONFIG.model_dump()
    data["models"]["gpt-4.1-mini"]["baseline"] = baseline
    return GatewayConfig.model_validate(data)


def test_baseline_prices_are_effective_dated_and_the_one_in_force_on_the_day_applies() -> None:
    config = with_baseline([
        {"effective_from": "2026-10-15", "input": "4.00", "output": "16.00"},
        {"effective_from": "2026-10-01", "input": "2.00", "output": "8.00"},
    ])  # fmt: skip
    rows = [row(3, "gpt-4.1-mini", MINI, 1_000_000, 0), row(20, "gpt-4.1-mini", MINI, 1_000_000, 0)]
    r = compute(rows, config, "team_x", "2026-10", NOW)
    assert r["baseline_cost_usd"] == "6.00"  # 2.00 on the 3rd, 4.00 on the 20th
    # Before the first baseline entry: the model's own price (no savings claimed).
    early = compute([row(3, "gpt-4.1-mini", MINI, 1_000_000, 0, month=9)], config, "team_x", "2026-09", NOW)
    assert early["baseline_cost_usd"] == early["actual_cost_usd"] == "0.40"


def test_a_single_baseline_object_is_still_accepted() -> None:
    config = with_baseline({"input": "2.00", "output": "8.00"})
    r = compute([row(3, "gpt-4.1-mini", MINI, 1_000_000, 0)], config, "team_x", "2026-10", NOW)
    assert r["baseline_cost_usd"] == "2.00"


def test_savings_are_not_annualised_from_less_than_the_stated_window() -> None:
    rows = [row(1, "gpt-4.1-mini", MINI, 1_000_000, 0, month=12)]
    r = compute(rows, CONFIG, "team_x", "2026-12", datetime(2026, 12, 3, 12, tzinfo=UTC))
    assert r["annualised_savings_usd"] is None
    assert f"{MIN_ANNUALISE_DAYS}-day minimum" in r["annualised_basis"] and "2.50 days" in r["annualised_basis"]
    later = compute(rows, CONFIG, "team_x", "2026-12", datetime(2026, 12, 11, tzinfo=UTC))
    assert later["annualised_savings_usd"] == str((Decimal(later["savings_usd"]) / 10 * 365).quantize(Decimal("0.01")))


def test_a_cache_hit_after_a_retroactive_price_change_saves_what_the_call_costs_at_the_new_price() -> None:
    # A re-rate moves no money on a hit (it cost 0), so its row keeps the unit prices it was stored at; the
    # avoided cost, and the baseline of a model without one, follow the book's price for the day instead.
    data = CONFIG.model_dump()
    data["models"]["gpt-4.1"]["prices"].append({"effective_from": "2026-10-01", "input": "1.00", "output": "4.00"})
    config = GatewayConfig.model_validate(data)
    billed = row(3, "gpt-4.1", UnitPrice("new", Decimal("1.00"), Decimal("4.00"), Decimal("1.00")), 1_000_000, 0)
    hit = RoiRow(date(2026, 10, 3), "gpt-4.1", "gpt-4.1", "openai", "cached", GPT, 1, 1_000_000, 0, 0, Decimal(0))
    r = compute([billed, hit], config, "team_x", "2026-10", NOW)
    (m,) = r["models"]
    assert (m["actual_cost_usd"], m["cache_savings_usd"], m["baseline_cost_usd"]) == ("1.00", "1.00", "2.00")
