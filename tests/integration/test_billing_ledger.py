"""The ledger over rows the meter's own pricing wrote: amounts recomputed here from the config's prices
(typed in again, not read from the code under test), before and after a rerate to a new price."""

from __future__ import annotations

from decimal import Decimal

from schemas.clickhouse import Store
from schemas.config import GatewayConfig
from schemas.prices import PriceBook
from services.billing import ledger
from services.meter.rerate import rerate_period
from tests.support.events import make_event
from tests.support.metered import CONFIG, MINI, NEW, OLD, PERIOD, cost, expected, meter, month, oct_, repriced


async def test_ledger_team_month_is_the_config_prices_before_and_after_a_rerate(store: Store) -> None:
    events = month("team-ledger")
    await meter(store, events)
    await meter(store, events[:3])  # a replayed batch: one row per event
    tm = await ledger.team_month(store, "team-ledger", PERIOD)
    assert tm.exact_usd == expected(events, after_rerate=False) and tm.unpriced == 0
    assert sum(g.requests for g in tm.groups if g.model == "gpt-4.1") == 3

    await rerate_period(store, PriceBook(repriced()), PERIOD)
    tm = await ledger.team_month(store, "team-ledger", PERIOD)
    assert tm.exact_usd == expected(events, after_rerate=True)
    versions = {(g.model, g.unit_input) for g in tm.groups}
    assert versions == {("gpt-4.1", OLD["input"]), ("gpt-4.1", NEW["input"]), ("gpt-4.1-mini", MINI["input"])}
    for g in tm.groups:  # every group's amount is its tokens at its own unit prices
        assert g.exact_usd == sum(Decimal(line.quantity) * line.unit_usd_per_1m / 1_000_000 for line in g.lines())
    assert tm.by_model() == {m: expected(events, True, m) for m in ("gpt-4.1", "gpt-4.1-mini")}

    (mtd,) = [m for m in await ledger.month_to_date(store, PERIOD) if m.team_id == "team-ledger"]
    assert mtd.usd == expected(events, after_rerate=True)
    assert mtd.tokens == sum(e.prompt_tokens + e.completion_tokens for e in events if e.status in ("ok", "error"))


async def test_one_group_never_merges_two_unit_prices_under_one_version(store: Store) -> None:
    """An in-place price edit keeps the version string; the ledger still keeps the two prices apart."""
    edited = CONFIG.model_dump()
    edited["models"]["gpt-4.1"]["prices"][0].update(input=Decimal("3.00"))
    a = make_event("team-edit", occurred_at=oct_(3), prompt_tokens=1_000, completion_tokens=10)
    b = make_event("team-edit", occurred_at=oct_(4), prompt_tokens=2_000, completion_tokens=20)
    await meter(store, [a])
    await meter(store, [b], GatewayConfig.model_validate(edited))
    tm = await ledger.team_month(store, "team-edit", PERIOD)
    assert len(tm.groups) == 2
    assert tm.exact_usd == cost(a, OLD) + cost(b, OLD | {"input": Decimal("3.00")})


def test_report_model_buckets_names_the_config_does_not_know() -> None:
    assert ledger.report_model("gpt-4.1", CONFIG) == "gpt-4.1"
    assert ledger.report_model("gpt-4", CONFIG) == "gpt-4"  # an alias is a known name
    assert ledger.report_model("\x1b[31mhello", CONFIG) == ledger.UNKNOWN_MODEL
