"""Reconciliation over metered rows and real invoices: adjustment lines carried to later invoices count for
the period they adjust, a team with no invoice yet is a state (not a difference against 0), sequence gaps are
judged over an instance's whole sequence, and dead letters, clock skew and unpriced events are reported."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from schemas.clickhouse import Store
from services.meter.rollups import refresh_all
from tests.support.billing import ADMIN
from tests.support.events import make_event
from tests.support.metered import expected, meter

CENT = Decimal("0.01")


def sept(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 9, day, hour, tzinfo=UTC)


async def new_team(billing, name: str) -> str:
    return (await billing.post("/v1/admin/teams", json={"name": name}, headers=ADMIN)).json()["team_id"]


async def reconcile(billing, period: str, team: str | None = None) -> dict:
    r = await billing.get("/v1/reconcile", params={"period": period} | ({"team": team} if team else {}),
                          headers=ADMIN)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


async def finalize(billing, tid: str, period: str) -> dict:
    r = await billing.post("/v1/admin/invoices/finalize", json={"period": period, "team": tid}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]


def billable(events: list) -> Decimal:
    """The invoice rule recomputed here: per (model, component) line, rounded once (one price per model)."""
    total = Decimal(0)
    for model in {e.served_model for e in events if e.status in ("ok", "error")}:
        mine = [e for e in events if e.served_model == model and e.status in ("ok", "error")]
        prices = {"gpt-4.1": ("2.00", "0.50", "8.00"), "gpt-4.1-mini": ("0.40", "0.10", "1.60")}[model]
        inp = sum(e.prompt_tokens - min(e.cached_tokens, e.prompt_tokens) for e in mine)
        cached = sum(min(e.cached_tokens, e.prompt_tokens) for e in mine)
        out = sum(e.completion_tokens for e in mine)
        for qty, unit in zip((inp, cached, out), prices, strict=True):
            total += (Decimal(qty) * Decimal(unit) / 1_000_000).quantize(CENT, rounding=ROUND_HALF_EVEN)
    return total


async def test_adjustments_carried_to_later_invoices_count_for_the_period_they_adjust(billing, store, unique):
    tid = await new_team(billing, f"rec-{unique}")
    events = [make_event(tid, occurred_at=sept(3), prompt_tokens=1_234_567, completion_tokens=76_543),
              make_event(tid, occurred_at=sept(4), served_model="gpt-4.1-mini", requested_model="gpt-4.1-mini",
                         prompt_tokens=999_999, completion_tokens=33_333, cached_tokens=111)]  # fmt: skip
    await meter(store, events)
    await refresh_all(store)
    await finalize(billing, tid, "2026-09")
    rep = await reconcile(billing, "2026-09", tid)
    assert rep["ok"], rep["problems"]
    assert {r["invoice_state"] for r in rep["rows"]} == {"invoiced"}
    assert Decimal(rep["totals"]["invoiced_usd"]) == billable(events)
    assert Decimal(rep["totals"]["metered_usd"]) == expected(events, after_rerate=False)

    late = make_event(tid, occurred_at=sept(29), prompt_tokens=500_001, completion_tokens=250_001)
    await meter(store, [late])
    await refresh_all(store)
    rep = await reconcile(billing, "2026-09", tid)
    assert rep["ok"], rep["problems"]  # the next invoice's draft carries it: pending, not wrong
    (gpt,) = [r for r in rep["rows"] if r["model"] == "gpt-4.1"]
    assert gpt["invoice_state"] == "adjustment_pending" and Decimal(gpt["carried_usd"]) > 0
    assert Decimal(rep["totals"]["billable_usd"]) == billable([*events, late])

    await finalize(billing, tid, "2026-10")  # the adjustment lines are now on October's invoice
    rep = await reconcile(billing, "2026-09", tid)
    assert rep["ok"], rep["problems"]
    assert {r["invoice_state"] for r in rep["rows"]} == {"invoiced"}
    assert Decimal(rep["totals"]["invoiced_usd"]) == billable([*events, late])


async def test_a_team_not_invoiced_yet_is_a_state_not_a_difference(billing, store, unique):
    billed, fresh = await new_team(billing, f"a-{unique}"), await new_team(billing, f"b-{unique}")
    await meter(store, [make_event(billed, occurred_at=sept(5)), make_event(fresh, occurred_at=sept(6))])
    await refresh_all(store)
    await finalize(billing, billed, "2026-09")
    rep = await reconcile(billing, "2026-09")
    mine = {r["team_id"]: r for r in rep["rows"] if r["team_id"] in (billed, fresh)}
    assert mine[fresh]["invoice_state"] == "not_invoiced" and mine[fresh]["invoice_difference_usd"] is None
    assert mine[billed]["invoice_state"] == "invoiced"
    assert not [p for p in rep["problems"] if p.get("team_id") in (billed, fresh)], rep["problems"]


async def test_sequence_gaps_are_judged_over_the_whole_sequence_not_per_month(billing, store, unique):
    tid, inst = await new_team(billing, f"seq-{unique}"), f"proxy-{unique}"

    def ev(seq: int, when: datetime):
        return make_event(tid, occurred_at=when, proxy_instance=inst, proxy_seq=seq)

    # proxy_seq is stamped when a call ends, occurred_at when it starts: 3 started in October before 2 did.
    events = [ev(1, datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)), ev(2, datetime(2026, 11, 1, 0, 0, 1, tzinfo=UTC)),
              ev(3, datetime(2026, 10, 31, 23, 59, 58, tzinfo=UTC)), ev(4, datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC)),
              ev(5, datetime(2026, 11, 2, tzinfo=UTC)), ev(7, datetime(2026, 11, 3, tzinfo=UTC)),
              ev(9, datetime(2026, 11, 4, tzinfo=UTC))]  # fmt: skip
    await meter(store, events)
    # 6 was lost; 8 was refused by the meter (a dead letter is accounted for, not a gap).
    refused = ev(8, datetime(2026, 11, 3, 12, tzinfo=UTC))
    await dead_letter(store, refused, "occurred_at is in the future beyond the tolerance", tid)
    await refresh_all(store)
    oct_seq = [s for s in (await reconcile(billing, "2026-10"))["sequences"] if s["proxy_instance"] == inst]
    assert oct_seq and oct_seq[0]["gaps"] == 0 and oct_seq[0]["missing"] == []
    nov_seq = [s for s in (await reconcile(billing, "2026-11"))["sequences"] if s["proxy_instance"] == inst]
    assert nov_seq[0]["gaps"] == 1 and nov_seq[0]["missing"] == [[6, 6]]


async def dead_letter(store: Store, e, reason: str, team: str, when: datetime | None = None) -> None:
    value = e.to_bytes().decode()
    await store.insert_rows(
        "usage_dead_letters",
        [[uuid.uuid4().hex, when or e.occurred_at, reason, "tollway.usage.v1", 0, 0, team, e.served_model,
          e.event_id, team, value]],
        ("dead_id", "dead_at", "reason", "topic", "partition", "offset", "team_id", "model", "event_id", "key",
         "value"),
    )  # fmt: skip


async def test_dead_letters_clock_skew_and_unpriced_events_make_ok_false(billing, store, unique):
    tid = await new_team(billing, f"dlq-{unique}")
    accepted = make_event(tid, occurred_at=sept(10))
    await meter(store, [accepted])
    await refresh_all(store)
    # A dead letter that was re-fed and accepted since is not outstanding.
    await dead_letter(store, accepted, "insert failed validation", tid, sept(10))
    rep = await reconcile(billing, "2026-09", tid)
    assert rep["ok"], rep["problems"]
    assert rep["totals"]["dead_letters"] == 1 and rep["totals"]["dead_letters_outstanding"] == 0

    skewed = make_event(tid, occurred_at=datetime(2027, 6, 1, tzinfo=UTC))
    await dead_letter(store, skewed, "occurred_at 2027-06-01T00:00:00Z is in the future (tolerance 300 s)", tid,
                      sept(11))  # fmt: skip
    rep = await reconcile(billing, "2026-09", tid)
    assert not rep["ok"]
    assert rep["totals"]["clock_skewed"] == 1 and rep["totals"]["dead_letters_outstanding"] == 1
    assert [p["kind"] for p in rep["problems"]] == ["dead_letters"]


async def test_an_unpriced_event_is_a_problem_until_priced(billing, store, unique):
    tid = await new_team(billing, f"unp-{unique}")
    # January 2025: before gpt-4.1's first price (2025-04-14), so the meter stores it unpriced (held).
    await meter(store, [make_event(tid, occurred_at=datetime(2025, 1, 10, tzinfo=UTC))])
    await refresh_all(store)
    rep = await reconcile(billing, "2025-01", tid)
    assert not rep["ok"] and rep["totals"]["unpriced"] == 1
    assert [(p["kind"], p["events"]) for p in rep["problems"]] == [("unpriced", 1)]
