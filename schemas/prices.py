"""The versioned price catalog and the pure pricing function.

An event is priced with the price in force at its `occurred_at` (UTC date); each priced row keeps the
version and the unit prices it used, so a past invoice never moves when the catalog changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

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


class PriceBook:
    """Lookup of (model, provider, time) -> UnitPrice. Route prices override the model's."""

    def __init__(self, config: GatewayConfig) -> None:
        self._table: dict[tuple[str, str], list[UnitPrice]] = {}
        self._dates: dict[tuple[str, str], list[date]] = {}
        for name, m in config.models.items():
            self._add(name, "*", m.prices)
            for r in m.routes:
                if r.prices:
                    self._add(name, r.provider, r.prices)

    def _add(self, model: str, provider: str, prices: list[Price]) -> None:
        ordered = sorted(prices, key=lambda p: p.effective_from)
        self._dates[(model, provider)] = [p.effective_from for p in ordered]
        self._table[(model, provider)] = [
            UnitPrice(
                version=f"{model}/{provider}@{p.effective_from.isoformat()}",
                input=p.input,
                output=p.output,
                cached_input=p.input if p.cached_input is None else p.cached_input,
            )
            for p in ordered
        ]

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
    return price_of(event.served_model or event.requested_model, event.provider, event.occurred_at, event.status,
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
    if status in ("cached", "rejected"):
        return Priced(unit=unit, cost=_ZERO_COST)
    return Priced(unit=unit, cost=cost_of(prompt_tokens, completion_tokens, cached_tokens, unit))
