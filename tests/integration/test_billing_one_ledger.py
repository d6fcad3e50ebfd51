"""One team-month, every surface: rows metered as the meter meters them, amounts recomputed here from the
config's prices, and usage API == ledger == ROI actual == reconcile metered == dashboard, before and
after a rerate to a new price, with replayed duplicates, a cache hit and a rejected made-up model."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from schemas.prices import PriceBook
from services.billing import ledger
from services.meter.rerate import rerate_period
from services.meter.rollups import refresh_all
from tests.support.billing import ADMIN, FINANCE
from tests.support.events import make_event
from tests.support.metered import PERIOD, expected, meter, month, oct_, prices_of, repriced

RANGE = {"from": "2026-10-01", "to": "2026-10-31"}
CENT = Decimal("0.01")


def cents(v: Decimal) -> Decimal:
    return v.quantize(CENT, rounding=ROUND_HALF_EVEN)


async def surfaces(billing, store, tid: str) -> dict[str, Decimal]:
    """The team-month's exact amount as each surface reports it."""
    usage = (await billing.get("/v1/usage", params={"team": tid, **RANGE}, headers=FINANCE)).json()
    roi = (await billing.get("/v1/reports/roi", params={"team": tid, "period": PERIOD}, headers=FINANCE)).json()
    rec = (await billing.get("/v1/reconcile", params={"team": tid, "period": PERIOD}, headers=ADMIN)).json()
    dash = (await billing.get("/v1/dashboard/data", params={"team": tid, **RANGE}, headers=FINANCE)).json()
    return {
        "usage": Decimal(usage["totals"]["cost_usd"]),
        "ledger": (await ledger.team_month(store, tid, PERIOD)).exact_usd,
        "roi": Decimal(roi["actual_cost_exact_usd"]),
        "reconcile": Decimal(rec["totals"]["metered_usd"]),
        "dashboard": Decimal(dash["totals"]["cost_usd"]),
    }


async def test_every_surface_gives_the_same_exact_amount_before_and_after_a_rerate(billing, store, unique):
    tid = (await billing.post("/v1/admin/teams", json={"name": f"ledger-{unique}"}, headers=ADMIN)).json()["team_id"]
    events = month(tid)
    await meter(store, events)
    await meter(store, events[:2])  # a replay: duplicates the ledger absorbs
    await refresh_all(store)  # the meter's rollup pass
    want = expected(events, after_rerate=False)
    assert await surfaces(billing, store, tid) == dict.fromkeys(("usage", "ledger", "roi", "reconcile", "dashboard"),
                                                                 want)  # fmt: skip

    await rerate_period(store, PriceBook(repriced()), PERIOD)
    await refresh_all(store)
    want = expected(events, after_rerate=True)
    assert want != expected(events, after_rerate=False)
    assert await surfaces(billing, store, tid) == dict.fromkeys(("usage", "ledger", "roi", "reconcile", "dashboard"),
                                                                 want)  # fmt: skip

    # Rounded figures foot: ROI rows round once, the total is their sum; the invoice is the same amount
    # under its own rule (each line rounded once).
    roi = (await billing.get("/v1/reports/roi", params={"team": tid, "period": PERIOD}, headers=FINANCE)).json()
    per_model = {m["model"]: Decimal(m["actual_cost_usd"]) for m in roi["models"]}
    assert per_model == {"gpt-4.1": cents(expected(events, True, "gpt-4.1")),
                         "gpt-4.1-mini": cents(expected(events, True, "gpt-4.1-mini"))}  # fmt: skip
    assert Decimal(roi["actual_cost_usd"]) == sum(per_model.values())
    invoices = await billing.get("/v1/invoices", params={"team": tid, "period": PERIOD}, headers=FINANCE)
    (draft,) = invoices.json()["data"]
    lines = (await ledger.team_month(store, tid, PERIOD)).lines()
    assert Decimal(draft["usage_usd"]) == sum(cents(line.exact_usd) for line in lines)
    rec = (await billing.get("/v1/reconcile", params={"team": tid, "period": PERIOD}, headers=ADMIN)).json()
    assert rec["ok"], rec["problems"]
    assert Decimal(rec["totals"]["billable_usd"]) == Decimal(draft["usage_usd"])

    # Finalize October, then a late October call arrives: every surface moves by its amount; the invoice
    # stays as issued and reconciliation says the difference is carried, not lost.
    r = await billing.post("/v1/admin/invoices/finalize", json={"period": PERIOD, "team": tid}, headers=ADMIN)
    assert r.status_code == 200, r.text
    late = make_event(tid, occurred_at=oct_(30), prompt_tokens=333_333, completion_tokens=22_222, cached_tokens=1)
    await meter(store, [late], repriced())  # the meters run the new catalog by now
    await refresh_all(store)
    want = expected([*events, late], after_rerate=True)
    assert await surfaces(billing, store, tid) == dict.fromkeys(("usage", "ledger", "roi", "reconcile", "dashboard"),
                                                                 want)  # fmt: skip
    rec = (await billing.get("/v1/reconcile", params={"team": tid, "period": PERIOD}, headers=ADMIN)).json()
    assert rec["ok"], rec["problems"]
    assert {r["model"]: r["invoice_state"] for r in rec["rows"] if r["team_id"] == tid} == {
        "gpt-4.1": "adjustment_pending", "gpt-4.1-mini": "invoiced", "no-such-model": "invoiced"}  # fmt: skip


async def test_usage_totals_show_billed_tokens_apart_from_cache_hit_tokens(billing, store, unique):
    tid = (await billing.post("/v1/admin/teams", json={"name": f"tok-{unique}"}, headers=ADMIN)).json()["team_id"]
    events = month(tid)
    await meter(store, events)
    body = (await billing.get("/v1/usage", params={"team": tid, "group_by": "model", **RANGE}, headers=FINANCE)).json()
    billable = [e for e in events if e.status in ("ok", "error")]
    hits = [e for e in events if e.cache_hit]
    t = body["totals"]
    assert t["billed_requests"] == len(billable)
    assert t["billed_input_tokens"] == sum(e.prompt_tokens - min(e.cached_tokens, e.prompt_tokens) for e in billable)
    assert t["billed_cached_input_tokens"] == sum(min(e.cached_tokens, e.prompt_tokens) for e in billable)
    assert t["billed_output_tokens"] == sum(e.completion_tokens for e in billable)
    assert (t["cache_hits"], t["cache_hit_prompt_tokens"], t["cache_hit_completion_tokens"]) == (
        len(hits), sum(e.prompt_tokens for e in hits), sum(e.completion_tokens for e in hits))  # fmt: skip
    # The old fields keep their meaning: every call's tokens, cache hits included.
    assert t["prompt_tokens"] == sum(e.prompt_tokens for e in events)
    # One price per model here (no rerate): billed tokens x the config's price == cost, per model.
    for g in body["groups"]:
        if g["model"] == "(unknown)":
            continue
        p = prices_of(next(e for e in billable if e.served_model == g["model"]), after_rerate=False)
        at_price = (g["billed_input_tokens"] * p["input"] + g["billed_cached_input_tokens"] * p["cached_input"]
                    + g["billed_output_tokens"] * p["output"]) / 1_000_000  # fmt: skip
        assert Decimal(g["cost_usd"]) == at_price
    # The rejected call's made-up model is one bucket in the report, not a row of its own.
    assert [g["model"] for g in body["groups"]] == ["(unknown)", "gpt-4.1", "gpt-4.1-mini"]
