"""A month of calls that use every price dimension (cache reads, 5-minute and 1-hour cache writes, output,
request fees, web searches, a long-context call, a service tier, inconsistent counts), metered by both decode
paths, then usage API == ledger == invoice JSON == invoice CSV == ROI actual == reconcile == dashboard, every
amount recomputed here by hand from prices typed in again; then a rerate to a price that changes the new
dimensions moves every surface by the same recomputed amount."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from types import SimpleNamespace

from schemas.config import GatewayConfig, load_config
from schemas.events import UsageEvent
from schemas.prices import PriceBook
from services.billing import ledger
from services.meter.columnar import decode_and_price_columnar
from services.meter.reference import decode_and_price
from services.meter.rerate import rerate_period
from services.meter.rollups import refresh_all
from services.meter.writer import UsageWriter
from tests.support.billing import ADMIN, FINANCE, running_billing
from tests.support.events import make_event

PERIOD, RANGE = "2026-10", {"from": "2026-10-01", "to": "2026-10-31"}
MODEL = "agent-model"
M, K = Decimal(1_000_000), Decimal(1_000)
CENT = Decimal("0.01")
_offsets = itertools.count(5_000_000)

# The prices, typed in again (never read back from the code under test).
BASE = {"input": "3", "output": "15", "cached_input": "0.3", "cache_write": "3.75", "cache_write_1h": "6"}
FEES = {"request": "0.01", "web_search": "10"}
LONG = {"input": "6", "output": "22.5", "cached_input": "0.6", "cache_write": "7.5", "cache_write_1h": "12"}
PRIORITY = {"input": "5", "output": "25", "cached_input": "0.5", "cache_write": "6.25"}  # 1h: its input, 5
# From Oct 10: cache writes, fees, the priority tier and the long-context input change.
BASE2 = BASE | {"cache_write": "4"}
FEES2 = {"request": "0.02", "web_search": "12"}
LONG2 = LONG | {"input": "6.5"}
PRIORITY2 = PRIORITY | {"input": "5.5"}
BASELINE = {"input": "10", "output": "30", "cached_input": "1", "cache_write": "12.5", "cache_write_1h": "20"}
BASELINE_FEES = {"request": "0.05", "web_search": "25"}
BASELINE_LONG = {"input": "20", "output": "45"}  # above 100K: its cache prices are its input, 20


def entry(day: str, base: dict, fees: dict, long: dict, above: int, tiers: dict) -> dict:
    return {"effective_from": day, **base, **fees, "long_context": {"above_prompt_tokens": above, **long},
            "service_tiers": tiers}  # fmt: skip


def config(repriced: bool) -> GatewayConfig:
    data = load_config("tollway.yaml").model_dump(mode="json")
    prices = [entry("2026-10-01", BASE, FEES, LONG, 200_000, {"priority": PRIORITY})]
    if repriced:
        prices.append(entry("2026-10-10", BASE2, FEES2, LONG2, 200_000, {"priority": PRIORITY2}))
    data["models"][MODEL] = {"routes": [{"provider": "anthropic", "model": "claude-x"}], "prices": prices,
                             "baseline": [entry("2000-01-01", BASELINE, BASELINE_FEES, BASELINE_LONG, 100_000, {})]}  # fmt: skip
    return GatewayConfig.model_validate(data)


def oct_(day: int) -> datetime:
    return datetime(2026, 10, day, 12, tzinfo=UTC)


def calls(team: str) -> list[UsageEvent]:
    def ev(day: int, **k) -> UsageEvent:
        return make_event(team, occurred_at=oct_(day), requested_model=MODEL, served_model=MODEL,
                          provider="anthropic", **k)  # fmt: skip

    return [
        ev(2, prompt_tokens=10_000, completion_tokens=700, cached_tokens=4_000, cache_write_tokens=2_000,
           cache_write_1h_tokens=1_000, web_search_requests=3, reasoning_tokens=300),
        ev(5, prompt_tokens=250_000, completion_tokens=1_000, cached_tokens=50_000, cache_write_tokens=10_000,
           web_search_requests=1),  # long context
        ev(12, prompt_tokens=5_000, completion_tokens=100, cache_write_tokens=500, cache_write_1h_tokens=100,
           service_tier="priority"),
        ev(13, prompt_tokens=300_000, completion_tokens=10, cache_write_1h_tokens=7, web_search_requests=2),
        ev(15, prompt_tokens=300, completion_tokens=0, status="error", http_status=502),  # a request fee
        ev(16, prompt_tokens=0, completion_tokens=0, status="error", http_status=502),  # no tokens: no fee
        ev(20, prompt_tokens=1_000, completion_tokens=50, cache_write_tokens=100, status="cached", cache_hit=True),
        ev(22, prompt_tokens=100, completion_tokens=5, cached_tokens=80, cache_write_tokens=50),  # clipped to 20
    ]  # fmt: skip


def parts(e: UsageEvent) -> dict[str, int]:
    """The billed quantities, carved out of prompt_tokens by hand: reads, then 5m writes, then 1h writes."""
    cached = min(e.cached_tokens, e.prompt_tokens)
    cw = min(e.cache_write_tokens, e.prompt_tokens - cached)
    cw1h = min(e.cache_write_1h_tokens, e.prompt_tokens - cached - cw)
    has_tokens = e.prompt_tokens + e.completion_tokens > 0
    return {"input": e.prompt_tokens - cached - cw - cw1h, "cached_input": cached, "cache_write": cw,
            "cache_write_1h": cw1h, "output": e.completion_tokens, "request": int(has_tokens),
            "web_search": e.web_search_requests}  # fmt: skip


def rates(e: UsageEvent, repriced: bool, baseline: bool = False) -> dict[str, Decimal]:
    """The unit prices the call is priced at (per 1M tokens; per request; per 1,000 searches)."""
    if baseline:
        base, fees, long, above, tier = BASELINE, BASELINE_FEES, BASELINE_LONG, 100_000, None
    elif repriced and e.occurred_at.date() >= date(2026, 10, 10):
        base, fees, long, above, tier = BASE2, FEES2, LONG2, 200_000, PRIORITY2
    else:
        base, fees, long, above, tier = BASE, FEES, LONG, 200_000, PRIORITY
    if e.service_tier == "priority" and tier is not None:
        chosen = tier
    elif e.prompt_tokens > above:
        chosen = long
    else:
        chosen = base
    inp = chosen["input"]
    out = {k: Decimal(chosen.get(k, inp)) for k in ("input", "cached_input", "cache_write", "cache_write_1h")}
    return out | {"output": Decimal(chosen["output"]), **{k: Decimal(v) for k, v in fees.items()}}


PER = {"request": Decimal(1), "web_search": K}


def cost(e: UsageEvent, repriced: bool, baseline: bool = False) -> dict[str, Decimal]:
    r = rates(e, repriced, baseline)
    return {d: Decimal(q) * r[d] / PER.get(d, M) for d, q in parts(e).items()}


def billable(events: list[UsageEvent]) -> list[UsageEvent]:
    return [e for e in events if e.status in ("ok", "error")]


def by_dimension(events: list[UsageEvent], repriced: bool) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for e in billable(events):
        for d, v in cost(e, repriced).items():
            out[d] = out.get(d, Decimal(0)) + v
    return out


def cents(v: Decimal) -> Decimal:
    return v.quantize(CENT, rounding=ROUND_HALF_EVEN)


async def meter(store, events: list[UsageEvent], cfg: GatewayConfig, columnar: bool) -> None:
    records = [SimpleNamespace(topic="tollway.usage.v1", partition=0, offset=next(_offsets), key=None,
                               value=e.to_bytes()) for e in events]  # fmt: skip
    batch, dead = (decode_and_price_columnar if columnar else decode_and_price)(records, PriceBook(cfg))
    assert not dead and (batch.columnar_rows == len(events) if columnar else True)
    assert await UsageWriter(store).insert(batch, asyncio.Event())


async def check_surfaces(client, store, team: str, events: list[UsageEvent], repriced: bool) -> None:
    dims = by_dimension(events, repriced)
    total = sum(dims.values(), Decimal(0))
    usage = (await client.get("/v1/usage", params={"team": team, **RANGE}, headers=FINANCE)).json()["totals"]
    assert Decimal(usage["cost_usd"]) == total
    assert {d: Decimal(usage[f"cost_{d}_usd"]) for d in dims} == dims
    paid = [parts(e) for e in billable(events)]
    assert (usage["billed_input_tokens"], usage["billed_cached_input_tokens"], usage["billed_cache_write_tokens"],
            usage["billed_cache_write_1h_tokens"], usage["billed_output_tokens"], usage["billed_fee_requests"],
            usage["billed_web_search_requests"]) == tuple(sum(p[d] for p in paid) for d in (
                "input", "cached_input", "cache_write", "cache_write_1h", "output", "request", "web_search"))  # fmt: skip
    assert usage["cache_write_tokens"] == sum(e.cache_write_tokens for e in events)

    month = await ledger.team_month(store, team, PERIOD)
    assert month.exact_usd == total

    # The invoice: a line per dimension and unit price, only where non-zero; its amounts recomputed here.
    want_lines: dict[tuple[str, Decimal], list] = {}
    for e in billable(events):
        r, q = rates(e, repriced), parts(e)
        for d in q:
            if q[d] and (r[d] or d not in PER):
                acc = want_lines.setdefault((d, r[d]), [0, Decimal(0)])
                acc[0] += q[d]
                acc[1] += Decimal(q[d]) * r[d] / PER.get(d, M)
    (draft,) = (await client.get("/v1/invoices", params={"team": team, "period": PERIOD}, headers=FINANCE)).json()[
        "data"
    ]
    price_field = {"request": "unit_price_usd_per_request", "web_search": "unit_price_usd_per_1k"}
    usage_lines = [x for x in draft["lines"] if x["type"] == "usage"]
    got: dict[tuple[str, Decimal], list] = {}  # summed over price versions (two versions may share a unit price)
    for x in usage_lines:
        acc = got.setdefault((x["component"], Decimal(x[price_field.get(x["component"], "unit_price_usd_per_1m")])),
                             [0, Decimal(0)])  # fmt: skip
        acc[0] += x["quantity"]
        acc[1] += Decimal(x["exact_amount_usd"])
    assert got == want_lines
    assert {x["component"] for x in usage_lines} == {"input", "cached_input", "cache_write", "cache_write_1h",
                                                     "output", "request", "web_search"}  # fmt: skip
    assert all(Decimal(x["amount_usd"]) == cents(Decimal(x["exact_amount_usd"])) for x in usage_lines)
    assert Decimal(draft["usage_usd"]) == sum((Decimal(x["amount_usd"]) for x in usage_lines), Decimal(0))
    text = (await client.get("/v1/invoices", params={"team": team, "period": PERIOD, "format": "csv"},
                             headers=FINANCE)).text  # fmt: skip
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["type"] == "usage"]
    in_json = {(x["price_version"], x["component"], x["quantity"], x["amount_usd"]) for x in usage_lines}
    assert {(r["price_version"], r["component"], int(r["quantity"]), r["amount_usd"]) for r in rows} == in_json
    assert sum(Decimal(r["amount_usd"]) for r in rows) == Decimal(draft["usage_usd"])
    assert {(r["component"], Decimal(r["unit_price_usd_per_1m"])) for r in rows} == set(want_lines)
    assert {r["component"]: r["price_basis"] for r in rows}["web_search"] == "1K web searches"

    roi = (await client.get("/v1/reports/roi", params={"team": team, "period": PERIOD}, headers=FINANCE)).json()
    assert Decimal(roi["actual_cost_exact_usd"]) == total
    # a baseline is a price: every dimension, its own long-context threshold (100K); cache hits count too
    baseline = sum((sum(cost(e, repriced, baseline=True).values(), Decimal(0)) for e in events
                    if e.status in ("ok", "error", "cached")), Decimal(0))  # fmt: skip
    assert Decimal(roi["baseline_cost_exact_usd"]) == baseline

    rec = (await client.get("/v1/reconcile", params={"team": team, "period": PERIOD}, headers=ADMIN)).json()
    assert Decimal(rec["totals"]["metered_usd"]) == total and rec["ok"], rec["problems"]
    assert Decimal(rec["totals"]["billable_usd"]) == Decimal(draft["usage_usd"])
    dash = (await client.get("/v1/dashboard/data", params={"team": team, **RANGE}, headers=FINANCE)).json()
    assert Decimal(dash["totals"]["cost_usd"]) == total  # the rollups: cost_total covers every dimension
    # a cache hit's saving: what it would have cost in every dimension at the rates it was stored with
    hits = [e for e in events if e.cache_hit]
    assert Decimal(dash["totals"]["cache_savings_usd"]) == sum(
        (sum(cost(e, repriced=False).values(), Decimal(0)) for e in hits), Decimal(0))  # fmt: skip


async def test_every_dimension_on_every_surface_before_and_after_a_rerate(store, bootstrap, unique):
    cfg = config(repriced=False)
    async with running_billing(store, bootstrap, config=cfg, quota_group=f"q-{unique}") as client:
        r = await client.post("/v1/admin/teams", json={"name": f"dims-{unique}"}, headers=ADMIN)
        team = r.json()["team_id"]
        events = calls(team)
        await meter(store, events[:4], cfg, columnar=True)
        await meter(store, events[4:], cfg, columnar=False)
        await meter(store, events[:2], cfg, columnar=False)  # a replay: absorbed
        stored = await store.query_dicts(
            "SELECT event_id, price_tier, unit_cache_write_1h, cost_web_search, cost_request FROM "
            "{db}.usage_events FINAL WHERE team_id = {t:String}", {"t": team})  # fmt: skip
        tiers = {str(r["event_id"]): r["price_tier"] for r in stored}
        assert [tiers[e.event_id] for e in events[:4]] == ["", "long_context", "priority", "long_context"]
        await refresh_all(store)
        await check_surfaces(client, store, team, events, repriced=False)

        result = await rerate_period(store, PriceBook(config(repriced=True)), PERIOD)
        moved = sum(by_dimension(events, True).values()) - sum(by_dimension(events, False).values())
        assert result.delta_total == moved and moved != 0
        adj = await store.query_dicts(
            "SELECT sum(delta_cache_write) cw, sum(delta_request) rq, sum(delta_web_search) ws, "
            "sum(delta_total) t FROM {db}.usage_adjustments FINAL WHERE team_id = {t:String}", {"t": team})  # fmt: skip
        after, before = by_dimension(events, True), by_dimension(events, False)
        assert (adj[0]["cw"], adj[0]["rq"], adj[0]["ws"], adj[0]["t"]) == (
            after["cache_write"] - before["cache_write"], after["request"] - before["request"],
            after["web_search"] - before["web_search"], moved)  # fmt: skip
        assert (await rerate_period(store, PriceBook(config(repriced=True)), PERIOD)).adjusted == 0  # idempotent
        await refresh_all(store)
    async with running_billing(store, bootstrap, config=config(repriced=True), quota_group=f"q2-{unique}") as client:
        await check_surfaces(client, store, team, events, repriced=True)
