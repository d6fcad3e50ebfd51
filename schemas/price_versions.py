"""The price versions put in force, recorded in ClickHouse, and the start check that keeps them unedited.

A version names what a price is (schemas/prices.py), so an in-place edit of a yaml entry already in force
would give one (model, provider, effective_from) two unit prices: rows and invoice lines priced before and
after the edit, under one date. Policy: refused at start, once the recorded price has priced usage (a row
or an adjustment carries its version). A price changes by a new entry with a later effective_from, then
`tollway rerate --period YYYY-MM` for the months it should correct. Free to edit: an entry not yet in force
(effective_from after today, UTC), and one in force that priced nothing (e.g. a mistyped price whose events
all became dead letters); the correction is then recorded in its place.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime

from schemas.clickhouse import Store
from schemas.config import ConfigError, GatewayConfig
from schemas.prices import CatalogEntry, UnitPrice, catalog

TABLE = "price_versions"
COLUMNS = ("model", "provider", "effective_from", "version", "unit_input", "unit_output", "unit_cached_input",
           "recorded_at", "recorded_by")  # fmt: skip
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


def to_record(config: GatewayConfig, recorded: Recorded, today: date) -> list[CatalogEntry]:
    """Entries in force whose version is not the recorded one (new, or an allowed correction)."""
    out = []
    for e in catalog(config):
        was = recorded.get(key(e))
        if e.effective_from <= today and (was is None or was.version != e.unit.version):
            out.append(e)
    return out


async def recorded_versions(store: Store) -> Recorded:
    rows = await store.query(f"SELECT model, provider, effective_from, version, unit_input, unit_output, "
                             f"unit_cached_input FROM {{db}}.{TABLE} FINAL")  # fmt: skip
    return {(m, p, since): UnitPrice(v, ui, uo, uc) for m, p, since, v, ui, uo, uc in rows}


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
    rows = [[*key(e), e.unit.version, e.unit.input, e.unit.output, e.unit.cached_input, now, by] for e in entries]
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
    return await record(store, to_record(config, recorded, today), by)


async def record_in_force(store: Store, config: GatewayConfig, by: str, today: date | None = None) -> int:
    """For a running process: record entries that came into force since it started. Never replaces a record
    (a conflict is for the next start to judge)."""
    today = today or datetime.now(UTC).date()
    recorded = await recorded_versions(store)
    return await record(store, [e for e in to_record(config, recorded, today) if key(e) not in recorded], by)
