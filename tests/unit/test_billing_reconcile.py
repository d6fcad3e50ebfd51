"""Reconciliation's reading of invoices (pure): adjustment lines count for the period they adjust,
wherever they were carried, and a team-period without an invoice is a state."""

from __future__ import annotations

from decimal import Decimal

from services.billing.reconcile import carried_amounts, invoice_state, invoiced_amounts


def usage(model: str, amount: str) -> dict:
    return {"type": "usage", "model": model, "amount_usd": amount}


def adjustment(period: str, model: str, amount: str) -> dict:
    return {"type": "adjustment", "amount_usd": amount,
            "adjusts": {"invoice_id": "inv_1", "period": period, "model": model, "component": "input"}}  # fmt: skip


def test_adjustment_lines_on_later_invoices_count_for_the_period_they_adjust():
    finalized = {
        ("t", "2026-09"): {"lines": [usage("a", "1.00"), usage("b", "2.00"), {"type": "plan_fee", "amount_usd": "9"}]},
        ("t", "2026-10"): {"lines": [usage("a", "5.00"), adjustment("2026-09", "a", "0.25")]},
        ("t", "2026-11"): {"lines": [adjustment("2026-09", "a", "-0.05"), adjustment("2026-10", "b", "1.00")]},
    }
    assert invoiced_amounts("2026-09", finalized) == {("t", "a"): Decimal("1.20"), ("t", "b"): Decimal("2.00")}
    assert invoiced_amounts("2026-10", finalized) == {("t", "a"): Decimal("5.00"), ("t", "b"): Decimal("1.00")}


def test_what_an_open_draft_carries_and_the_states():
    draft = {"lines": [usage("a", "3.00"), adjustment("2026-09", "a", "0.10"), adjustment("2026-08", "a", "7")]}
    assert carried_amounts("2026-09", draft) == {"a": Decimal("0.10")}
    assert invoice_state(None, Decimal(0), Decimal("4")) == "not_invoiced"
    assert invoice_state(Decimal("4"), Decimal(0), Decimal("4")) == "invoiced"
    assert invoice_state(Decimal("3.90"), Decimal("0.10"), Decimal("4")) == "adjustment_pending"
    assert invoice_state(Decimal("3.90"), Decimal(0), Decimal("4")) == "difference"
