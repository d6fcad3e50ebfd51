"""The invoice lifecycle against a real ClickHouse engine and rows the meter's own pricing wrote: periods
finalize in order, the open month waits for its end plus the grace, the plan fee follows the team's life and
plan changes, lines never merge two unit prices, adjustments say their cause, a net credit is a credit note,
and two billing replicas on one store never duplicate a number or replace an invoice.

Expected amounts are recomputed here from tokens and the prices typed in again (not read from the code)."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import orjson

from schemas.config import GatewayConfig, Price, load_config
from schemas.periods import bounds, period_of
from schemas.prices import PriceBook
from services.billing.accounts import Accounts
from services.billing.invoices import Invoices
from services.meter.rerate import rerate_period
from tests.support.billing import ADMIN, FINANCE
from tests.support.events import make_event
from tests.support.metered import meter

CONFIG = load_config("tollway.yaml")
CENT = Decimal("0.01")
FEE_TEAM = Decimal("49")  # plan "team" in tollway.yaml; plan "enterprise" has fee 0
MINI = {"served_model": "gpt-4.1-mini", "requested_model": "gpt-4.1-mini"}


def r2(x: Decimal) -> Decimal:
    return x.quantize(CENT, rounding=ROUND_HALF_EVEN)


def at(month: int, day: int, hour: int = 12) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


def repriced(effective: date, **units: str) -> GatewayConfig:
    """tollway.yaml with a new gpt-4.1 price from `effective` (a price change, applied by a rerate)."""
    data = CONFIG.model_dump()
    data["models"]["gpt-4.1"]["prices"].append(Price(effective_from=effective, **units).model_dump())
    return GatewayConfig.model_validate(data)


def edited_in_place(**units: str) -> GatewayConfig:
    """tollway.yaml with gpt-4.1's price edited where it stands (same effective_from): the audit's case."""
    data = CONFIG.model_dump()
    data["models"]["gpt-4.1"]["prices"][0].update(units)
    return GatewayConfig.model_validate(data)


async def new_team(billing, unique: str, name: str, **body) -> str:
    r = await billing.post("/v1/admin/teams", json={"name": f"{name}-{unique}", **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["team_id"]


async def finalize(billing, tid: str, period: str):
    return await billing.post("/v1/admin/invoices/finalize", json={"period": period, "team": tid}, headers=ADMIN)


async def invoice(billing, tid: str, period: str) -> dict:
    r = await billing.get("/v1/invoices", params={"team": tid, "period": period}, headers=FINANCE)
    assert r.status_code == 200, r.text
    (inv,) = r.json()["data"]
    return inv


def lines_of(inv: dict, kind: str) -> list[dict]:
    return [line for line in inv["lines"] if line["type"] == kind]


async def test_periods_finalize_in_order_and_the_409_names_the_earliest_open_period(billing, store, unique):
    tid = await new_team(billing, unique, "order")
    await meter(store, [make_event(tid, occurred_at=at(9, 3)), make_event(tid, occurred_at=at(10, 3))], CONFIG)

    r = await finalize(billing, tid, "2026-10")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert "2026-09" in err["message"] and err["code"] == "period_out_of_order"
    # Nothing was stored by the refusal: October is still a draft.
    assert (await invoice(billing, tid, "2026-10"))["status"] == "draft"

    assert (await finalize(billing, tid, "2026-09")).status_code == 200
    r = await finalize(billing, tid, "2026-10")
    assert r.status_code == 200, r.text
    # A late September event after both are closed lands on November as late usage, never stranded.
    await meter(store, [make_event(tid, occurred_at=at(9, 29), prompt_tokens=1_000_000, completion_tokens=0)],
                CONFIG)  # fmt: skip
    (adj,) = lines_of(await invoice(billing, tid, "2026-11"), "adjustment")
    assert (adj["reason"], adj["adjusts"]["period"], adj["quantity"], adj["amount_usd"]) == (
        "late usage", "2026-09", 1_000_000, "2.00")  # fmt: skip
    # Re-finalizing a closed period is the stored invoice, not a conflict.
    r = await finalize(billing, tid, "2026-09")
    assert r.status_code == 200 and r.json()["data"][0]["created"] is False


async def test_the_open_month_cannot_be_finalized(billing, store, unique):
    tid = await new_team(billing, unique, "open")
    now = datetime.now(UTC)
    r = await finalize(billing, tid, period_of(now))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "period_open" and period_of(now) in r.json()["error"]["message"]
    assert (await invoice(billing, tid, period_of(now)))["status"] == "draft"


async def test_a_month_waits_for_its_end_plus_the_grace_for_late_events(store):
    accounts = Accounts(store, CONFIG)
    await accounts.load()
    team = await accounts.create_team("grace-team")
    await meter(store, [make_event(team.team_id, occurred_at=at(9, 30, 23))], CONFIG)
    _, end = bounds("2026-09")
    clock = {"now": end + timedelta(minutes=59)}
    inv = Invoices(store, CONFIG, grace_s=3600, clock=lambda: clock["now"])
    try:
        await inv.finalize(team, "2026-09")
        raise AssertionError("finalized inside the grace")
    except Exception as err:  # the typed 409, asserted by its attributes
        assert getattr(err, "code", None) == "period_open", err
        assert "2026-10-01T01:00:00Z" in str(err)
    clock["now"] = end + timedelta(hours=1)
    doc, created = await inv.finalize(team, "2026-09")
    assert created and doc["status"] == "finalized"


async def test_no_plan_fee_before_the_team_existed_and_the_first_month_is_prorated(billing, store, unique):
    tid = await new_team(billing, unique, "fee")
    await meter(store, [make_event(tid, occurred_at=at(9, 3), prompt_tokens=1_000_000, completion_tokens=0)], CONFIG)
    sept = await invoice(billing, tid, "2026-09")
    assert lines_of(sept, "plan_fee") == [] and sept["plan_fee_usd"] == "0.00" and sept["total_usd"] == "2.00"

    (created,) = (await store.query("SELECT created_at FROM {db}.teams FINAL WHERE team_id = {t:String}",
                                    parameters={"t": tid}))[0]  # fmt: skip
    created = created.replace(tzinfo=UTC, microsecond=0)
    period = period_of(created)
    start, end = bounds(period)
    (fee,) = lines_of(await invoice(billing, tid, period), "plan_fee")
    seconds = int((end - created).total_seconds())
    month = int((end - start).total_seconds())
    assert (fee["plan"], fee["seconds"], fee["unit"], fee["month_seconds"]) == ("team", seconds, "month", month)
    assert Decimal(fee["quantity"]) == (Decimal(seconds) / month).quantize(Decimal("0.000001"))
    assert fee["amount_usd"] == str(r2(FEE_TEAM * seconds / month))


async def test_a_plan_change_mid_month_prorates_the_fee_by_seconds(billing, store, unique):
    tid = await new_team(billing, unique, "planchange")
    for plan in ("enterprise", "team"):
        r = await billing.patch(f"/v1/admin/teams/{tid}", json={"plan": plan}, headers=ADMIN)
        assert r.status_code == 200, r.text
    rows = await store.query("SELECT plan, effective_at FROM {db}.plan_changes FINAL WHERE scope = 'team' "
                             "AND entity_id = {t:String} ORDER BY effective_at", parameters={"t": tid})  # fmt: skip
    assert [p for p, _ in rows] == ["team", "enterprise", "team"]
    created, to_enterprise, back = (t.replace(tzinfo=UTC, microsecond=0) for _, t in rows)
    period = period_of(created)
    start, end = bounds(period)
    month = int((end - start).total_seconds())
    fees = lines_of(await invoice(billing, tid, period), "plan_fee")
    # enterprise's fee is 0: only the two "team" spans are billed, each rounded once.
    spans = [s for s in (int((to_enterprise - created).total_seconds()), int((end - back).total_seconds())) if s]
    assert [(f["plan"], f["seconds"]) for f in fees] == [("team", s) for s in spans]
    assert [f["amount_usd"] for f in fees] == [str(r2(FEE_TEAM * s / month)) for s in spans]
    # A key's plan changes are kept too (they set its limits; the fee follows the team's plan).
    key = (await billing.post("/v1/admin/keys", json={"team_id": tid, "plan": "free"}, headers=ADMIN)).json()
    assert (await billing.patch(f"/v1/admin/keys/{key['key_id']}", json={"plan": "team"}, headers=ADMIN)).is_success
    rows = await store.query("SELECT plan FROM {db}.plan_changes FINAL WHERE scope = 'key' AND entity_id = {k:String} "
                             "ORDER BY effective_at", parameters={"k": key["key_id"]})  # fmt: skip
    assert [p for (p,) in rows] == ["free", "team"]
    assert lines_of(await invoice(billing, tid, period), "plan_fee") == fees


async def test_an_in_place_price_edit_never_merges_two_unit_prices(billing, store, unique):
    tid = await new_team(billing, unique, "edit")
    await meter(store, [make_event(tid, occurred_at=at(9, 3), prompt_tokens=1_000_000, completion_tokens=0)], CONFIG)
    await meter(store, [make_event(tid, occurred_at=at(9, 4), prompt_tokens=2_000_000, completion_tokens=0)],
                edited_in_place(input="2.50"))  # fmt: skip
    inputs = sorted((line["unit_price_usd_per_1m"], line["quantity"], line["amount_usd"])
                    for line in lines_of(await invoice(billing, tid, "2026-09"), "usage")
                    if line["component"] == "input")  # fmt: skip
    assert inputs == [("2", 1_000_000, "2.00"), ("2.5", 2_000_000, "5.00")]


async def test_adjustment_lines_are_labelled_by_cause_late_usage_rerating_rounding(billing, store, unique):
    tid = await new_team(billing, unique, "labels")
    big = make_event(tid, occurred_at=at(9, 12), prompt_tokens=1_000_000, completion_tokens=100_000)
    tiny = make_event(tid, occurred_at=at(9, 2), prompt_tokens=12_500, completion_tokens=0, **MINI)  # 0.005 -> 0.00
    await meter(store, [big, tiny], CONFIG)
    fin = (await finalize(billing, tid, "2026-09")).json()["data"][0]

    # A price change from 2026-09-10, applied by a rerate; then late events metered with the new catalog.
    new = repriced(date(2026, 9, 10), input="2.20", output="8.80", cached_input="0.55")
    await rerate_period(store, PriceBook(new), "2026-09")
    late_cached = make_event(tid, occurred_at=at(9, 20), prompt_tokens=100_000, cached_tokens=100_000,
                             completion_tokens=0)  # fmt: skip
    late_tiny = make_event(tid, occurred_at=at(9, 3), prompt_tokens=12_500, completion_tokens=0, **MINI)
    await meter(store, [late_cached, late_tiny], new)

    adj = lines_of(await invoice(billing, tid, "2026-10"), "adjustment")
    got = {(a["reason"], a["adjusts"]["model"], a["adjusts"]["component"], a["unit_price_usd_per_1m"],
            a["quantity"], a["amount_usd"]) for a in adj}  # fmt: skip
    exact_late_tiny = Decimal(12_500) * Decimal("0.40") / 1_000_000
    assert got == {
        ("re-rating", "gpt-4.1", "input", "2", -1_000_000, "-2.00"),
        ("re-rating", "gpt-4.1", "input", "2.2", 1_000_000, "2.20"),
        ("re-rating", "gpt-4.1", "output", "8", -100_000, "-0.80"),
        ("re-rating", "gpt-4.1", "output", "8.8", 100_000, "0.88"),
        ("late usage", "gpt-4.1", "cached_input", "0.55", 100_000, str(r2(Decimal("0.055")))),
        ("late usage", "gpt-4.1-mini", "input", "0.4", 12_500, str(r2(exact_late_tiny))),
        # the mini item now bills round(25,000 x 0.40 / 1M) = 0.01 in all; 0.00 + 0.00 billed so far
        ("rounding", "gpt-4.1-mini", "input", "0.4", 0, "0.01"),
    }
    assert all(a["adjusts"]["invoice_number"] == fin["number"] and a["adjusts"]["period"] == "2026-09" for a in adj)


async def test_a_net_credit_is_a_numbered_credit_note_referencing_the_invoice_it_credits(billing, store, unique):
    tid = await new_team(billing, unique, "credit")
    await meter(store, [make_event(tid, occurred_at=at(9, 12), prompt_tokens=1_000_000, completion_tokens=0)], CONFIG)
    sept = (await finalize(billing, tid, "2026-09")).json()["data"][0]
    assert sept["total_usd"] == "2.00" and sept["number"].startswith("TW-")
    await rerate_period(store, PriceBook(repriced(date(2026, 9, 10), input="1.00", output="8.00")), "2026-09")

    r = await finalize(billing, tid, "2026-10")
    assert r.status_code == 200, r.text
    out = r.json()["data"][0]
    assert out["number"].startswith("CN-") and out["kind"] == "credit_note" and out["total_usd"] == "-1.00"
    note = (await billing.get(f"/v1/invoices/{out['invoice_id']}", headers=FINANCE)).json()
    assert note["object"] == "credit_note" and note["kind"] == "credit_note" and note["credit_usd"] == "1.00"
    assert note["credits"] == [{"invoice_id": sept["invoice_id"], "invoice_number": sept["number"],
                                "period": "2026-09", "amount_usd": "-1.00"}]  # fmt: skip
    assert Decimal(note["total_usd"]) == sum(Decimal(line["amount_usd"]) for line in note["lines"])
    r = await billing.get(f"/v1/invoices/{out['invoice_id']}", headers={**FINANCE, "Accept": "text/csv"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["kind"] for row in rows} == {"credit_note"}
    (credit_row,) = [row for row in rows if row["type"] == "credits"]
    assert (credit_row["adjusts_invoice"], credit_row["adjusts_period"], credit_row["amount_usd"]) == (
        sept["number"], "2026-09", "-1.00")  # fmt: skip
    assert {row["type"]: row["amount_usd"] for row in rows if not row["line"]}["total"] == "-1.00"


async def test_two_billing_replicas_finalizing_at_once_give_one_invoice_per_team_and_unique_numbers(store):
    accounts = Accounts(store, CONFIG)
    await accounts.load()
    teams = [await accounts.create_team(f"replica-{i}") for i in range(6)]
    await meter(store, [make_event(t.team_id, occurred_at=at(9, 5), prompt_tokens=1_000 * (i + 1))
                        for i, t in enumerate(teams)], CONFIG)  # fmt: skip
    # Two service objects, each with its own lock, over one store: two billing replicas on one server.
    a, b = Invoices(store, CONFIG), Invoices(store, CONFIG)
    results = await asyncio.gather(*(s.finalize(t, "2026-09") for t in teams for s in (a, b)))
    by_team: dict[str, list[dict]] = {}
    for doc, _ in results:
        by_team.setdefault(doc["team_id"], []).append(doc)
    for t in teams:
        first, second = by_team[t.team_id]
        assert first == second, "two replicas answered two different invoices for one team-month"
        assert await a.by_id(first["invoice_id"]) == first == await b.by_id(first["invoice_id"])
    numbers = [docs[0]["number"] for docs in by_team.values()]
    assert len(set(numbers)) == len(teams), numbers
    assert sum(created for _, created in results) == len(teams)
    rows = await store.query("SELECT invoice_id, count() FROM {db}.invoice_documents GROUP BY invoice_id")
    assert sorted(n for _, n in rows) == [1] * len(teams)  # the loser's write never landed


async def test_an_upgraded_database_keeps_its_invoices_and_numbering_continues(store):
    accounts = Accounts(store, CONFIG)
    await accounts.load()
    team = await accounts.create_team("legacy-team")
    legacy = {"object": "invoice", "invoice_id": "inv_legacy1", "number": "TW-000041", "status": "finalized",
              "team_id": team.team_id, "period": "2026-08", "lines": [], "total_usd": "0.00",
              "finalized_at": "2026-09-01T02:00:00Z", "content_hash": "sha256:x"}  # fmt: skip
    # As the code before 031 stored it, in 010's table; then the upgrade: 031 runs on this database.
    await store.insert_rows("invoices", [["inv_legacy1", "TW-000041", 41, team.team_id, "2026-08", Decimal("0.00"),
                                          orjson.dumps(legacy).decode(), "sha256:x", at(9, 1, 2)]],
                            ("invoice_id", "number", "seq", "team_id", "period", "total_usd", "content",
                             "content_hash", "finalized_at"))  # fmt: skip
    await store.command("ALTER TABLE {db}.schema_migrations DELETE WHERE version = 31 SETTINGS mutations_sync = 1")
    assert await store.migrate() == [31]
    inv = Invoices(store, CONFIG)
    assert (await inv.finalized(team.team_id)) == {"2026-08": legacy}
    assert await inv.by_id("inv_legacy1") == legacy
    doc, created = await inv.finalize(team, "2026-09")
    assert created and doc["number"] == "TW-000042"
    with_history = await store.query("SELECT plan FROM {db}.plan_changes FINAL WHERE entity_id = {t:String}",
                                     parameters={"t": team.team_id})  # fmt: skip
    assert with_history == [("team",)]  # the backfill collapses onto the row accounts wrote


async def test_finalizing_every_team_checks_all_first_and_skips_teams_that_did_not_exist(billing, store, unique):
    early = await new_team(billing, unique, "early")
    later = await new_team(billing, unique, "later")  # created now, no usage in the autumn
    await meter(store, [make_event(early, occurred_at=at(9, 3)), make_event(early, occurred_at=at(10, 3))], CONFIG)

    r = await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-10"}, headers=ADMIN)
    assert r.status_code == 409 and "2026-09" in r.json()["error"]["message"], r.text
    for tid in (early, later):  # one team out of order finalizes nobody
        assert (await invoice(billing, tid, "2026-10"))["status"] == "draft"

    r = await billing.post("/v1/admin/invoices/finalize", json={"period": "2026-09"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    finalized = {d["team_id"] for d in r.json()["data"]}
    assert early in finalized and later not in finalized
    assert (await invoice(billing, later, "2026-09"))["status"] == "draft"
