"""Invoice lines with no engine running: rounding once, plan-fee proration by seconds over the plan
history, adjustments split by cause, credit notes, and a CSV with the same lines as the JSON.
(The first two tests were in test_billing_quota_math.py, moved here with the pure invoice code.)"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from services.billing.invoice_lines import (
    adjustment_lines,
    assemble,
    billed_items,
    content_hash,
    items_of,
    plan_fee_lines,
    to_csv,
    usage_lines,
)
from services.billing.ledger import LedgerGroup
from services.billing.plan_history import PlanSpan, TeamHistory, spans

NOW = datetime(2026, 11, 15, tzinfo=UTC)
NOV_SECONDS = 30 * 86_400


def items(*groups: tuple[str, str, int, int, int, tuple[str, str, str]]):
    lines = []
    for model, version, inp, cached, out, units in groups:
        ui, uo, uc = (Decimal(x) for x in units)
        lines += LedgerGroup(model, version, ui, uo, uc, 1, inp, cached, out).lines()
    return items_of(lines)


def doc(period: str, usage, fees=(), adjustments=()):
    return assemble("team_x", "x", "team", period, usage_lines(usage), list(fees), list(adjustments), 0, NOW)


def test_invoice_lines_round_once_half_even_and_add_up_exactly():
    # 1250 tokens at $2/1M = $0.0025 -> half-even to $0.00; 3750 at $2/1M = $0.0075 -> $0.01
    whole = [PlanSpan("team", datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))]
    inv = doc("2026-10", items(("a", "a@1", 1250, 0, 3750, ("2", "2", "1"))),
              plan_fee_lines("2026-10", whole, {"team": Decimal("49")}))  # fmt: skip
    amounts = {line["component"]: line["amount_usd"] for line in inv["lines"] if line["type"] == "usage"}
    assert amounts == {"input": "0.00", "output": "0.01"}
    assert inv["total_usd"] == "49.01" and inv["subtotal_usd"] == "49.01" and inv["kind"] == "invoice"
    assert sum(Decimal(line["amount_usd"]) for line in inv["lines"]) == Decimal(inv["total_usd"])
    assert content_hash(inv) == content_hash(dict(inv))


def test_one_version_with_two_unit_prices_gives_two_lines():
    lines = usage_lines(items(("a", "a@1", 1_000_000, 0, 0, ("2", "8", "1")),
                              ("a", "a@1", 2_000_000, 0, 0, ("2.5", "8", "1"))))  # fmt: skip
    assert [(x["unit_price_usd_per_1m"], x["quantity"], x["amount_usd"]) for x in lines] == [
        ("2", 1_000_000, "2.00"), ("2.5", 2_000_000, "5.00")]  # fmt: skip


def test_plan_spans_start_at_creation_and_follow_plan_changes():
    created = datetime(2026, 11, 10, 6, 30, 15, 999_000, tzinfo=UTC)
    change = datetime(2026, 11, 20, tzinfo=UTC)
    history = TeamHistory(created.replace(microsecond=0), ((created.replace(microsecond=0), "team"),
                                                           (change, "enterprise")))  # fmt: skip
    assert spans("2026-10", history, "team") == []  # before the team existed
    got = spans("2026-11", history, "team")
    assert [(s.plan, s.seconds) for s in got] == [("team", int((change - created.replace(microsecond=0))
                                                               .total_seconds())), ("enterprise", 11 * 86_400)]  # fmt: skip
    assert [(s.plan, s.seconds) for s in spans("2026-12", history, "team")] == [("enterprise", 31 * 86_400)]
    legacy = TeamHistory(None, ())  # a team from before the history: its current plan, the whole month
    assert [(s.plan, s.seconds) for s in spans("2026-11", legacy, "team")] == [("team", NOV_SECONDS)]


def test_plan_fee_is_prorated_by_seconds_and_rounded_once_per_span():
    start = datetime(2026, 11, 10, 6, 30, 15, tzinfo=UTC)
    end = datetime(2026, 12, 1, tzinfo=UTC)
    (line,) = plan_fee_lines("2026-11", [PlanSpan("team", start, end)], {"team": Decimal("49")})
    seconds = int((end - start).total_seconds())
    exact = Decimal(49) * seconds / NOV_SECONDS
    assert (line["seconds"], line["month_seconds"], line["unit"]) == (seconds, NOV_SECONDS, "month")
    assert line["quantity"] == str((Decimal(seconds) / NOV_SECONDS).quantize(Decimal("0.000001")))
    (whole,) = plan_fee_lines(
        "2026-11", [PlanSpan("team", datetime(2026, 11, 1, tzinfo=UTC), end)], {"team": Decimal("49")}
    )
    assert (whole["quantity"], whole["unit"], whole["amount_usd"]) == (1, "month", "49.00")
    assert line["amount_usd"] == str(exact.quantize(Decimal("0.01"), ROUND_HALF_EVEN))
    assert plan_fee_lines("2026-11", [PlanSpan("enterprise", start, end)], {"enterprise": Decimal(0)}) == []


def test_adjustments_are_split_into_late_usage_rerating_and_rounding():
    billed_doc = doc("2026-09", items(("a", "a@1", 1_000_000, 0, 0, ("2", "8", "1")),
                                      ("b", "b@1", 3_000, 0, 0, ("2", "8", "1"))))  # b: 0.006 -> 0.01  # fmt: skip
    billed_doc.update(invoice_id="inv_1", number="TW-000001", status="finalized")
    billed = billed_items("2026-09", {"2026-09": billed_doc})
    # Known at the last billing: a's 1M tokens, half of them since re-rated to a@2.
    known = items(("a", "a@1", 500_000, 0, 0, ("2", "8", "1")), ("a", "a@2", 500_000, 0, 0, ("1", "8", "1")),
                  ("b", "b@1", 3_000, 0, 0, ("2", "8", "1")))  # fmt: skip
    # Now: plus 250k late tokens at a@2 and 3k late b tokens (b: 6k x 2 / 1M = 0.012 -> 0.01 in all).
    now = items(("a", "a@1", 500_000, 0, 0, ("2", "8", "1")), ("a", "a@2", 750_000, 0, 0, ("1", "8", "1")),
                ("b", "b@1", 6_000, 0, 0, ("2", "8", "1")))  # fmt: skip
    got = {(x["reason"], x["adjusts"]["model"], x["adjusts"]["price_version"], x["quantity"], x["amount_usd"])
           for x in adjustment_lines("2026-09", billed_doc, now, known, billed)}  # fmt: skip
    assert got == {
        ("re-rating", "a", "a@1", -500_000, "-1.00"),
        ("re-rating", "a", "a@2", 500_000, "0.50"),
        ("late usage", "a", "a@2", 250_000, "0.25"),
        ("late usage", "b", "b@1", 3_000, "0.01"),
        ("rounding", "b", "b@1", 0, "-0.01"),
    }


def test_a_negative_total_is_a_credit_note_naming_what_it_credits_and_the_csv_says_the_same():
    billed_doc = doc("2026-09", items(("a", "a@1", 1_000_000, 0, 0, ("2", "8", "1"))))
    billed_doc.update(invoice_id="inv_1", number="TW-000001", status="finalized")
    now = items(("a", "a@2", 1_000_000, 0, 0, ("1", "8", "1")))
    adj = adjustment_lines("2026-09", billed_doc, now, now, billed_items("2026-09", {"2026-09": billed_doc}))
    note = doc("2026-10", {}, adjustments=adj)
    assert (note["kind"], note["object"], note["total_usd"], note["credit_usd"]) == (
        "credit_note", "credit_note", "-1.00", "1.00")  # fmt: skip
    assert note["credits"] == [{"invoice_id": "inv_1", "invoice_number": "TW-000001", "period": "2026-09",
                                "amount_usd": "-1.00"}]  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(to_csv([note]))))
    assert [(r["reason"], r["quantity"], r["amount_usd"]) for r in rows if r["line"]] == [
        (x["reason"], str(x["quantity"]), x["amount_usd"]) for x in note["lines"]]  # fmt: skip
    assert [(r["adjusts_invoice"], r["amount_usd"]) for r in rows if r["type"] == "credits"] == [("TW-000001", "-1.00")]
