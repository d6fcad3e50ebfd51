"""The versioned price catalog and the pure pricing function.

An event is priced with the price in force at its `occurred_at` (UTC date); each priced row keeps the
version and the unit prices it used, so a past invoice never moves when the catalog changes. A version names
what the price is: `model/provider@effective_from#hash`, the hash over every unit price, so two different
prices can never share a version (schemas/price_versions.py refuses a start that edits one in force).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from schemas.billed import BILLABLE_STATUSES, billed_model
from schemas.config import GatewayConfig, Price
from schemas.events import UsageEvent

MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class UnitPrice:
    version: str
    input: Decimal
    output: Decimal
    cached_input: Decimal


@dataclass(frozen=True, slots=True)
class Cost:
    input: Decimal
    cached_input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.cached_input + self.output


@dataclass(frozen=True, slots=True)
class Priced:
    """The outcome of pricing one event. `unit is None` means no price was in force: held as unpriced."""

    unit: UnitPrice | None
    cost: Cost


def _digits(d: Decimal) -> str:
    return format(d.normalize(), "f")  # 2, 2.0 and 2.00 are one price


def unit_price(model: str, provider: str, p: Price) -> UnitPrice:
    """The config entry as priced: cached_input defaults to input; the version hashes all three unit prices."""
    cached = p.input if p.cached_input is None else p.cached_input
    digest = hashlib.sha256("|".join(_digits(x) for x in (p.input, p.output, cached)).encode()).hexdigest()[:8]
    return UnitPrice(f"{model}/{provider}@{p.effective_from.isoformat()}#{digest}", p.input, p.output, cached)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    model: str
    provider: str  # "*" for the model's own prices, else the route's provider
    effective_from: date
    unit: UnitPrice


def catalog(config: GatewayConfig) -> Iterator[CatalogEntry]:
    """Every price entry of the config, as PriceBook prices with it. Route prices override the model's."""
    for name, m in config.models.items():
        lists = {"*": m.prices} | {r.provider: r.prices for r in m.routes if r.prices}  # a later route wins
        for provider, prices in lists.items():
            for p in sorted(prices, key=lambda p: p.effective_from):
                yield CatalogEntry(name, provider, p.effective_from, unit_price(name, provider, p))


class PriceBook:
    """Lookup of (model, provider, time) -> UnitPrice. Route prices override the model's."""

    def __init__(self, config: GatewayConfig) -> None:
        self._table: dict[tuple[str, str], list[UnitPrice]] = {}
        self._dates: dict[tuple[str, str], list[date]] = {}
        for e in catalog(config):
            self._dates.setdefault((e.model, e.provider), []).append(e.effective_from)
            self._table.setdefault((e.model, e.provider), []).append(e.unit)

    def at(self, model: str, provider: str, when: datetime) -> UnitPrice | None:
        key = (model, provider) if (model, provider) in self._table else (model, "*")
        entries = self._table.get(key)
        if not entries:
            return None
        day = when.date()
        found = None
        for d, unit in zip(self._dates[key], entries, strict=True):
            if d <= day:
                found = unit
            else:
                break
        return found


def cost_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int, unit: UnitPrice) -> Cost:
    # OpenAI counts cached tokens inside prompt_tokens: bill them once, at the cached rate.
    cached = min(cached_tokens, prompt_tokens)
    return Cost(
        input=Decimal(prompt_tokens - cached) * unit.input / MILLION,
        cached_input=Decimal(cached) * unit.cached_input / MILLION,
        output=Decimal(completion_tokens) * unit.output / MILLION,
    )


def price(event: UsageEvent, book: PriceBook) -> Priced:
    """Cost of one event. Cache hits and rejections cost nothing but are still priced (version kept)."""
    return price_of(billed_model(event.served_model, event.requested_model), event.provider, event.occurred_at, event.status,
                    event.prompt_tokens, event.completion_tokens, event.cached_tokens, book)  # fmt: skip


_ZERO_COST = Cost(ZERO, ZERO, ZERO)
_NO_PRICE_NEEDED = UnitPrice("none", ZERO, ZERO, ZERO)


def price_of(model: str, provider: str, occurred_at: datetime, status: str, prompt_tokens: int,
             completion_tokens: int, cached_tokens: int, book: PriceBook) -> Priced:  # fmt: skip
    """`price` on plain values (the meter's hot path prices decoded dicts without building models)."""
    unit = book.at(model, provider, occurred_at)
    if unit is None:
        # A call with no tokens (rejected, failed before upstream) needs no price to be exact.
        return Priced(unit=None, cost=_ZERO_COST) if prompt_tokens or completion_tokens else Priced(
            unit=_NO_PRICE_NEEDED, cost=_ZERO_COST)  # fmt: skip
    if status not in BILLABLE_STATUSES:  # a cache hit or a rejection
        return Priced(unit=unit, cost=_ZERO_COST)
    return Priced(unit=unit, cost=cost_of(prompt_tokens, completion_tokens, cached_tokens, unit))
