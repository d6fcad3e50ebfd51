"""The price versions put in force, recorded in ClickHouse, and the start check that keeps them unedited.

A version names what a price is (schemas/prices.py), so an in-place edit of a yaml entry already in force
would give one (model, provider, effective_from) two unit prices: rows and invoice lines priced before and
after the edit, under one date. Policy: refused at start, once the recorded price has priced usage (a row
or an adjustment carries its version). A price changes by a new entry with a later effective_from, then
`tollway rerate --period YYYY-MM` for the months it should correct. Free to edit: an entry not yet in force
(effective_from after today, UTC), and one in force that priced nothing (e.g. a mistyped price whose events
all became dead letters); the correction is then recorded in its place.

A record holds every unit price of its entry (migration 038), so a version reads back whole
(`recorded_price_sets`): the base set's seven, the long-context threshold and rates, each service tier's rates
and each tier's own long-context rates, exact decimal text; and the text the version hashes. A record written
before 038 (the three base prices) is written again, whole, at the next start.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

from schemas.clickhouse import Store
from schemas.config import ConfigError, GatewayConfig
from schemas.prices import LONG_CONTEXT, TIER_LONG_CONTEXT, CatalogEntry, PriceSet, UnitPrice, catalog

TABLE = "price_versions"
COLUMNS = ("model", "provider", "effective_from", "version", "unit_input", "unit_output", "unit_cached_input",
           "recorded_at", "recorded_by", "unit_cache_write", "unit_cache_write_1h", "unit_request", "unit_web_search",
           "long_context_above_prompt_tokens", "rate_sets", "identity", "whole")  # fmt: skip
RATES = ("input", "output", "cached_input", "cache_write", "cache_write_1h")  # a rate set's; the fees are the entry's
Key = tuple[str, str, str]  # model, provider, effective_from (ISO date)
Recorded = dict[Key, UnitPrice]


class PriceEditedInPlace(ConfigError):
    """The config changes a unit price already in force."""


def key(e: CatalogEntry) -> Key:
    return e.model, e.provider, e.effective_from.isoformat()


def _units(u: UnitPrice) -> str:
    return " ".join(f"{name} {format(x.normalize(), 'f')}" for name, x in
                    (("input", u.input), ("output", u.output), ("cached_input", u.cached_input)))  # fmt: skip


def conflicts(config: GatewayConfig, recorded: Recorded, today: date) -> list[tuple[CatalogEntry, UnitPrice]]:
    """(entry, recorded price) for each config entry in force whose unit prices differ from the recorded ones."""
    out = []
    for e in catalog(config):
        was = recorded.get(key(e))
        if e.effective_from <= today and was is not None and was.version != e.unit.version:
            out.append((e, was))
    return out


def refusal(e: CatalogEntry, was: UnitPrice) -> str:
    who = e.model if e.provider == "*" else f"{e.model} (route {e.provider})"
    return (f"the price of {who} in force from {e.effective_from} was edited in place ({_units(was)} -> "
            f"{_units(e.unit)}; version {was.version} -> {e.unit.version}): a price in force never changes; restore it, add a new entry with a later "
            f"effective_from, then run `tollway rerate --period YYYY-MM`")  # fmt: skip


def to_record(config: GatewayConfig, recorded: Recorded, today: date, partial: frozenset[Key] = frozenset()
              ) -> list[CatalogEntry]:  # fmt: skip
    """Entries in force whose version is not the recorded one (new, or an allowed correction), and those whose
    record is `partial` (written before every unit price was recorded: the same price, written whole)."""
    out = []
    for e in catalog(config):
        was = recorded.get(key(e))
        if e.effective_from <= today and (was is None or was.version != e.unit.version or key(e) in partial):
            out.append(e)
    return out


async def recorded_versions(store: Store) -> Recorded:
    rows = await store.query(f"SELECT model, provider, effective_from, version, unit_input, unit_output, "
                             f"unit_cached_input FROM {{db}}.{TABLE} FINAL")  # fmt: skip
    return {(m, p, since): UnitPrice(v, ui, uo, uc) for m, p, since, v, ui, uo, uc in rows}


async def partial_records(store: Store) -> frozenset[Key]:
    """Records written before 038 (the three base prices only)."""
    rows = await store.query(f"SELECT model, provider, effective_from FROM {{db}}.{TABLE} FINAL WHERE whole = 0")
    return frozenset((m, p, since) for m, p, since in rows)


def _text(d: Decimal) -> str:
    return format(d.normalize(), "f")


def _rates(u: UnitPrice) -> dict[str, str]:
    return {r: _text(getattr(u, r)) for r in RATES}


def rate_sets(ps: PriceSet) -> str:
    """Every rate set but the base one, as exact decimal text (the `rate_sets` column)."""
    lc = ps.long_context
    return orjson.dumps({
        "long_context": None if lc is None else {"above_prompt_tokens": lc[0], **_rates(lc[1])},
        "tiers": {name: _rates(u) for name, u in sorted(ps.tiers.items())},
        "tiers_long_context": {name: _rates(u) for name, u in sorted(ps.tiers_long_context.items())},
    }).decode()  # fmt: skip


def _row(e: CatalogEntry, now: datetime, by: str) -> list[Any]:
    u, lc = e.unit, e.prices.long_context
    return [*key(e), u.version, u.input, u.output, u.cached_input, now, by, u.cache_write, u.cache_write_1h,
            u.request, u.web_search, 0 if lc is None else lc[0], rate_sets(e.prices), e.identity, 1]  # fmt: skip


def price_set_of(version: str, base: dict[str, Decimal], sets: str) -> PriceSet:
    """The PriceSet a whole record holds (`base`: the unit_ columns by dimension, `sets`: rate_sets)."""
    fees = (base["request"], base["web_search"])

    def unit(r: dict[str, Any], tier: str) -> UnitPrice:
        inp, out, cached, cw, cw1h = (Decimal(str(r[name])) for name in RATES)
        return UnitPrice(version, inp, out, cached, cw, cw1h, *fees, tier=tier)

    s = orjson.loads(sets)
    lc = s["long_context"]
    return PriceSet(
        version,
        unit({k: base[k] for k in RATES}, ""),
        None if lc is None else (int(lc["above_prompt_tokens"]), unit(lc, LONG_CONTEXT)),
        {name: unit(r, name) for name, r in s["tiers"].items()},
        {name: unit(r, TIER_LONG_CONTEXT.format(name)) for name, r in s["tiers_long_context"].items()},
    )


async def recorded_price_sets(store: Store) -> dict[Key, PriceSet]:
    """Every whole record read back as the PriceSet it priced with: equal, Decimal for Decimal, to the entry's."""
    rows = await store.query(f"SELECT model, provider, effective_from, version, unit_input, unit_output, "
                             f"unit_cached_input, unit_cache_write, unit_cache_write_1h, unit_request, unit_web_search, "
                             f"rate_sets FROM {{db}}.{TABLE} FINAL WHERE whole = 1")  # fmt: skip
    out = {}
    for m, p, since, v, *units, sets in rows:
        base = dict(zip(("input", "output", "cached_input", "cache_write", "cache_write_1h", "request", "web_search"),
                        units, strict=True))  # fmt: skip
        out[(m, p, since)] = price_set_of(v, base, sets)
    return out


async def versions_in_use(store: Store, versions: list[str]) -> set[str]:
    """Those of `versions` that priced a stored row or an adjustment (a scan: only run on a conflict)."""
    if not versions:
        return set()
    rows = await store.query(
        "SELECT DISTINCT price_version FROM {db}.usage_events WHERE price_version IN {v:Array(String)} UNION ALL "
        "SELECT DISTINCT price_version FROM {db}.usage_adjustments WHERE price_version IN {v:Array(String)}",
        {"v": versions},
    )
    return {r[0] for r in rows}


async def record(store: Store, entries: Iterable[CatalogEntry], by: str) -> int:
    now = datetime.now(UTC)
    rows = [_row(e, now, by) for e in entries]
    if rows:
        await store.insert_rows(TABLE, rows, COLUMNS)
    return len(rows)


async def check_and_record(store: Store, config: GatewayConfig, by: str, today: date | None = None) -> int:
    """At start (up, meter, billing, rerate): raise PriceEditedInPlace naming every in-place edit of a price that
    priced usage; else record the entries now in force. Returns how many were recorded."""
    today = today or datetime.now(UTC).date()
    recorded = await recorded_versions(store)
    found = conflicts(config, recorded, today)
    # Rows priced before versions had a hash carry the name alone (`model/provider@date`): they count as uses.
    names = {was.version: (was.version, was.version.split("#", 1)[0]) for _, was in found}
    used = await versions_in_use(store, sorted({n for pair in names.values() for n in pair}))
    problems = [refusal(e, was) for e, was in found if used.intersection(names[was.version])]
    if problems:
        raise PriceEditedInPlace("; ".join(problems))
    return await record(store, to_record(config, recorded, today, await partial_records(store)), by)


async def record_in_force(store: Store, config: GatewayConfig, by: str, today: date | None = None) -> int:
    """For a running process: record entries that came into force since it started. Never replaces a record
    (a conflict is for the next start to judge)."""
    today = today or datetime.now(UTC).date()
    recorded, partial = await recorded_versions(store), await partial_records(store)
    # new entries, and partial records of the very same price written whole; an edit waits for the next start
    fresh = [e for e in to_record(config, recorded, today, partial)
             if key(e) not in recorded or (key(e) in partial and recorded[key(e)].version == e.unit.version)]  # fmt: skip
    return await record(store, fresh, by)
