"""Invoices and ROI over rows the meter's own pricing wrote to a real ClickHouse engine: lines recomputed
here from tokens and unit prices, CSV equal to JSON, finalization immutable under late events."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from types import SimpleNamespace

from schemas.clickhouse import Store
from schemas.config import load_config
from schemas.prices import PriceBook
from services.billing.invoices import content_hash
from services.meter.reference import decode_and_price
from services.meter.writer import UsageWriter
from tests.support.billing import ADMIN, FINANCE
from tests.support.events import make_event

CONFIG = load_config("tollway.yaml")
# USD per 1M tokens from tollway.yaml, typed in again here so the test does not trust the code under test.
PRICES = {"gpt-4.1": {"input": "2.00", "cached_input": "0.50", "output": "8.00"},
          "gpt-4.1-mini": {"input": "0.40", "cached_input": "0.10", "output": "1.60"}}  # fmt: skip


_offsets = itertools.count()


async def write(store: Store, events: list) -> None:
    """Price and insert as the meter does (fresh offsets each call: a batch's offsets name its dedup token)."""
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=next(_offsets), key=None,
                               value=e.to_bytes()) for e in events]  # fmt: skip
    batch, dead = decode_and_price(records, PriceBook(CONFIG))
    assert not dead
    assert await UsageWriter(store).insert(batch, asyncio.Event())


def expected_lines(events: list) -> dict[tuple[str, str], tuple[int, str]]:
    qty: dict[tuple[str, str], int] = {}
    for e in events:
        if e.status not in ("ok", "error"):
            continue
        cached = min(e.cached_tokens, e.prompt_tokens)
        for comp, n in (("input", e.prompt_tokens - cached), ("cached_input", cached), ("output", e.completion_tokens)):
            qty[(e.served_model, comp)] = qty.get((e.served_model, comp), 0) + n
    return {
        k: (n, str((Decimal(n) * Decimal(PRICES[k[0]][k[1]]) / 1_000_000).quantize(Decimal("0.01"), ROUND_HALF_EVEN)))
        for k, n in qty.items()
        if n
    }


def sept(day: int) -> datetime:
    return datetime(2026, 9, day, 12, tzinfo=UTC)


async def test_invoice_lines_recompute_from_tokens_csv_matches_and_finalized_invoice_never_changes(
    billing, store, unique
):
    team = (await billing.post("/v1/admin/teams", json={"name": f"inv-{unique}"}, headers=ADMIN)).json()
    tid = team["team_id"]
    events = [
        make_event(tid, occurred_at=sept(1), prompt_tokens=123_457, completion_tokens=98_765, cached_tokens=23_456),
        make_event(tid, occurred_at=sept(2), prompt_tokens=1_000_001, completion_tokens=3),
        make_event(tid, occurred_at=sept(3), served_model="gpt-4.1-mini", requested_model="gpt-4.1-mini",
                   prompt_tokens=777_777, completion_tokens=55_555, cached_tokens=100_000),
        make_event(tid, occurred_at=sept(4), status="cached", cache_hit=True, prompt_tokens=999, completion_tokens=9),
    ]  # fmt: skip
    await write(store, events)
    await write(store, events[:2])  # a replayed batch: FINAL dedup keeps one row per event

    r = await billing.get("/v1/invoices", params={"team": tid, "period": "2026-09"}, headers=FINANCE)
    assert r.status_code == 200, r.text
    (draft,) = r.json()["data"]
    assert draft["status"] == "draft" and draft["currency"] == "USD" and draft["number"] is None
    usage = {(line["model"], line["component"]): (line["quantity"], line["amount_usd"])
             for line in draft["lines"] if line["type"] == "usage"}  # fmt: skip
    assert usage == expected_lines(events)
    for line in draft["lines"]:
        if line["type"] == "usage":
            assert line["unit_price_usd_per_1m"] == str(Decimal(PRICES[line["model"]][line["component"]]).normalize())
    fee = [line for line in draft["lines"] if line["type"] == "plan_fee"]
    assert fee == []  # the team was created after September: no plan fee for a month before it existed
    assert Decimal(draft["total_usd"]) == sum(Decimal(line["amount_usd"]) for line in draft["lines"])

    # CSV parses and says the same thing as the JSON.
    r = await billing.get(f"/v1/invoices/{draft['invoice_id']}", headers={**FINANCE, "Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    lines = [row for row in rows if row["line"]]
    assert [
        (row["type"], row["model"], row["component"], int(row["quantity"]), row["amount_usd"]) for row in lines
    ] == [
        (x["type"], x.get("model", ""), x.get("component", ""), x["quantity"], x["amount_usd"]) for x in draft["lines"]
    ]
    assert {row["type"]: row["amount_usd"] for row in rows if not row["line"]}["total"] == draft["total_usd"]

    # Finalize: numbered, hashed, stored.
    r = await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-09", "team": tid}, headers=ADMIN)
    assert r.status_code == 200, r.text
    (fin,) = r.json()["data"]
    assert fin["created"] and fin["number"].startswith("TW-") and fin["total_usd"] == draft["total_usd"]
    final = (await billing.get(f"/v1/invoices/{fin['invoice_id']}", headers=FINANCE)).json()
    assert final["status"] == "finalized" and final["content_hash"] == content_hash(final)

    # A late event and a re-delivered old one for the closed period.
    late = make_event(tid, occurred_at=sept(30), prompt_tokens=500_000, completion_tokens=250_000)
    await write(store, [late, events[0]])
    again = (await billing.get(f"/v1/invoices/{fin['invoice_id']}", headers=FINANCE)).json()
    assert again == final
    listed = (await billing.get("/v1/invoices", params={"team": tid, "period": "2026-09"}, headers=ADMIN)).json()
    assert listed["data"] == [final]
    r = await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-09", "team": tid}, headers=ADMIN)
    assert r.json()["data"][0] == {**fin, "created": False}

    # The late usage lands on the next invoice as adjustment lines naming what they adjust.
    october = (await billing.get("/v1/invoices", params={"team": tid, "period": "2026-10"}, headers=ADMIN)).json()
    adj = [line for line in october["data"][0]["lines"] if line["type"] == "adjustment"]
    assert {(a["adjusts"]["invoice_number"], a["adjusts"]["period"], a["adjusts"]["component"]) for a in adj} == {
        (fin["number"], "2026-09", "input"), (fin["number"], "2026-09", "output")
    }  # fmt: skip
    full = expected_lines([*events, late])
    billed = {(x["model"], x["component"]): x["amount_usd"] for x in final["lines"] if x["type"] == "usage"}
    for a in adj:
        key = (a["adjusts"]["model"], a["adjusts"]["component"])
        assert a["reason"] == "late usage"
        assert a["quantity"] == {"input": 500_000, "output": 250_000}[key[1]]
        assert Decimal(a["amount_usd"]) == Decimal(full[key][1]) - Decimal(billed[key])
    inv10 = october["data"][0]
    assert Decimal(inv10["total_usd"]) == sum(Decimal(line["amount_usd"]) for line in inv10["lines"])

    # Finalizing October moves the adjustments onto it; November then has none for September.
    await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-10", "team": tid}, headers=ADMIN)
    nov = (await billing.get("/v1/invoices", params={"team": tid, "period": "2026-11"}, headers=ADMIN)).json()
    assert not [line for line in nov["data"][0]["lines"] if line["type"] == "adjustment"]


async def test_roi_report_compares_with_baseline_and_csv_matches(billing, store, unique):
    team = (await billing.post("/v1/admin/teams", json={"name": f"roi-{unique}"}, headers=ADMIN)).json()
    tid = team["team_id"]
    mini = {"served_model": "gpt-4.1-mini", "requested_model": "gpt-4.1-mini"}
    await write(store, [
        make_event(tid, occurred_at=sept(5), prompt_tokens=1_000_000, completion_tokens=1_000_000, **mini),
        make_event(tid, occurred_at=sept(6), status="cached", cache_hit=True, prompt_tokens=1_000_000,
                   completion_tokens=0, **mini),
        make_event(tid, occurred_at=sept(7), served_model="gpt-4.1-mini", requested_model="gpt-4.1",
                   fallback_used=True, prompt_tokens=1_000_000, completion_tokens=0),
        make_event(tid, occurred_at=sept(8), prompt_tokens=1_000_000, completion_tokens=0),
    ])  # fmt: skip
    key = (await billing.post("/v1/admin/keys", json={"team_id": tid}, headers=ADMIN)).json()
    r = await billing.get(
        "/v1/reports/roi", params={"period": "2026-09"}, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert r.status_code == 200, r.text
    roi = r.json()
    # actual: mini 0.40 + 1.60, cached 0, routed mini 0.40, gpt-4.1 2.00 = 4.40
    # baseline: mini rows at 2/8 -> 10.00 + 2.00 (cached); routed at gpt-4.1 (2.00); gpt-4.1 own 2.00 = 16.00
    assert (roi["actual_cost_usd"], roi["baseline_cost_usd"], roi["savings_usd"]) == ("4.40", "16.00", "11.60")
    assert roi["savings_pct"] == "72.50"
    assert roi["savings_breakdown_usd"] == {"cache": "0.40", "routing": "1.60", "model_choice": "9.60"}
    assert roi["annualised_savings_usd"] == str((Decimal("11.60") / 30 * 365).quantize(Decimal("0.01")))
    assert {m["model"] for m in roi["models"]} == {"gpt-4.1", "gpt-4.1-mini"}
    r = await billing.get("/v1/reports/roi", params={"team": tid, "period": "2026-09"},
                          headers={**FINANCE, "Accept": "text/csv"})  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(r.text)))
    total = next(row for row in rows if row["model"] == "TOTAL")
    assert (total["actual_cost_usd"], total["baseline_cost_usd"], total["savings_usd"]) == ("4.40", "16.00", "11.60")
    per_model = {row["model"]: row["savings_usd"] for row in rows if row["model"] != "TOTAL"}
    assert per_model == {m["model"]: m["savings_usd"] for m in roi["models"]}
