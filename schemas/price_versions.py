"""The price versions put in force, recorded in ClickHouse, and the start check that keeps them unedited.

A version names what a price is (schemas/prices.py), so an in-place edit of a yaml entry already in force
would give one (model, provider, effective_from) two unit prices: rows and invoice lines priced before and
after the edit, under one date. Policy: refused at start. A price changes by a new entry with a later
effective_from, then `tollway rerate --period YYYY-MM` for the months it should correct. An entry not yet in
force (effective_from after today, UTC) may be edited freely; it is recorded once it comes into force.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime

from schemas.clickhouse import Store
from schemas.config import ConfigError, GatewayConfig
from schemas.prices import CatalogEntry, UnitPrice, catalog

TABLE = "price_versions"
COLUMNS = ("version", "model", "provider", "effective_from", "unit_input", "unit_output", "unit_cached_input",
           "recorded_at", "recorded_by")  # fmt: skip
Key = tuple[str, str, str]  # model, provider, effective_from (ISO date)


class PriceEditedInPlace(ConfigError):
    """The config changes a unit price already in force."""


def _key(e: CatalogEntry) -> Key:
    return e.model, e.provider, e.effective_from.isoformat()


def _units(u: UnitPrice) -> str:
    return " ".join(f"{name} {format(x.normalize(), 'f')}" for name, x in
                    (("input", u.input), ("output", u.output), ("cached_input", u.cached_input)))  # fmt: skip


def edits(config: GatewayConfig, recorded: dict[Key, dict[str, UnitPrice]], today: date) -> list[str]:
    """One line per config entry in force whose unit prices differ from every version recorded for its key."""
    out = []
    for e in catalog(config):
        versions = recorded.get(_key(e))
        if e.effective_from > today or not versions or e.unit.version in versions:
            continue
        was = next(iter(sorted(versions.items())))[1]
        who = e.model if e.provider == "*" else f"{e.model} (route {e.provider})"
        out.append(f"the price of {who} in force from {e.effective_from} was edited in place ({_units(was)} -> "
                   f"{_units(e.unit)}): a price in force never changes; restore it, add a new entry with a later "
                   f"effective_from, then run `tollway rerate --period YYYY-MM`")  # fmt: skip
    return out


def to_record(config: GatewayConfig, recorded: dict[Key, dict[str, UnitPrice]], today: date) -> list[CatalogEntry]:
    """Entries in force not recorded yet, and not in conflict with a recorded version (that is for the start
    check to refuse, never for a running process to write: two recorded prices would refuse every config)."""
    return [e for e in catalog(config) if e.effective_from <= today and not recorded.get(_key(e))]


async def recorded_versions(store: Store) -> dict[Key, dict[str, UnitPrice]]:
    rows = await store.query(f"SELECT model, provider, effective_from, version, unit_input, unit_output, "
                             f"unit_cached_input FROM {{db}}.{TABLE} FINAL")  # fmt: skip
    out: dict[Key, dict[str, UnitPrice]] = {}
    for model, provider, since, version, ui, uo, uc in rows:
        out.setdefault((model, provider, since), {})[version] = UnitPrice(version, ui, uo, uc)
    return out


async def record(store: Store, entries: Iterable[CatalogEntry], by: str) -> int:
    now = datetime.now(UTC)
    rows = [[e.unit.version, e.model, e.provider, e.effective_from.isoformat(), e.unit.input, e.unit.output,
             e.unit.cached_input, now, by] for e in entries]  # fmt: skip
    if rows:
        await store.insert_rows(TABLE, rows, COLUMNS)
    return len(rows)


async def check_and_record(store: Store, config: GatewayConfig, by: str, today: date | None = None) -> int:
    """At start (meter, billing, rerate): raise PriceEditedInPlace naming every in-place edit; else record the
    entries now in force. Returns how many were recorded."""
    today = today or datetime.now(UTC).date()
    recorded = await recorded_versions(store)
    problems = edits(config, recorded, today)
    if problems:
        raise PriceEditedInPlace("; ".join(problems))
    return await record(store, to_record(config, recorded, today), by)


async def record_in_force(store: Store, config: GatewayConfig, by: str, today: date | None = None) -> int:
    """For a running process: record entries that came into force since it started (never refuses)."""
    today = today or datetime.now(UTC).date()
    return await record(store, to_record(config, await recorded_versions(store), today), by)
