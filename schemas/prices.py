"""The versioned price catalog and the pure pricing function.

An event is priced with the price in force at its `occurred_at` (UTC date); each priced row keeps the
version and the unit prices it used, so a past invoice never moves when the catalog changes. A version names
what the price is: `model/provider@effective_from#hash`, the hash over every unit price, so two different
prices can never share a version (schemas/price_versions.py refuses a start that edits one in force).

The price model (docs/metering.md "Prices"): a call is priced in seven dimensions from its counts,

    uncached input  = prompt - cached - cache_write - cache_write_1h   x input          per 1M
    cache read      = cached                                           x cached_input   per 1M
    cache write 5m  = cache_write                                      x cache_write    per 1M
    cache write 1h  = cache_write_1h                                   x cache_write_1h per 1M
    output          = completion (reasoning inside)                    x output         per 1M
    request         = 1 for a billable call that has tokens            x request        per request
    web search      = web_search_requests                              x web_search     per 1,000

at one set of rates chosen per call (`PriceSet.select`, the one place): when prompt_tokens exceed the price's
long-context threshold, the event's service tier's own long-context rates if it has them, else the
long-context rates (tier rates are published for short prompts: OpenAI's priority processing "excludes long
context", and Anthropic prices long prompts in a tier, e.g. batch, as that tier's discount on the long-context
rates); at or below it, the event's service tier if the price has it, else the base rates (`UnitPrice.tier`
says which: '', a tier name, 'long_context' or '<tier>+long_context'). prompt_tokens counts all input, so the parts are carved out of it in the order
above: counts that claim more than prompt_tokens are clipped (cached first, then 5-minute writes, then
1-hour writes), so a call is never billed for more input than it had and no part is negative.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple, Protocol

from schemas.billed import BILLABLE_STATUSES, billed_model
from schemas.config import GatewayConfig, Price, Rates
from schemas.events import UsageEvent

MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)
ZERO = Decimal(0)
LONG_CONTEXT = "long_context"  # UnitPrice.tier of a call priced at a price's long-context tier
TIER_LONG_CONTEXT = "{}+long_context"  # ... at a service tier's own long-context rates

# The dimensions, in the order above: name -> how many units one unit price is for (one fact, one place: the
# meter's columns unit_<name> / cost_<name>, the ledger's lines and the invoices read it).
PER: dict[str, Decimal] = {
    "input": MILLION, "cached_input": MILLION, "cache_write": MILLION, "cache_write_1h": MILLION,
    "output": MILLION, "request": Decimal(1), "web_search": THOUSAND,
}  # fmt: skip
DIMENSIONS: tuple[str, ...] = tuple(PER)


class Cost(NamedTuple):  # tuples, not frozen dataclasses: built on every priced call (~1 us less each)
    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write: Decimal = ZERO
    cache_write_1h: Decimal = ZERO
    request: Decimal = ZERO
    web_search: Decimal = ZERO

    @property
    def total(self) -> Decimal:
        return (self.input + self.cached_input + self.cache_write + self.cache_write_1h + self.output
                + self.request + self.web_search)  # fmt: skip


class Quantities(NamedTuple):
    """How many units of each dimension a call (or a sum of calls) bills."""

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    output: int = 0
    request: int = 0
    web_search: int = 0


def _formula(unit: UnitPrice, q: Quantities) -> Cost:
    """The cost of each dimension: units x unit price / units per price (PER). THE formula; `cost_at` is this
    with the results that depend on the price alone taken from the price (the same Decimals, exponent and all)."""
    return Cost(
        input=Decimal(q.input) * unit.input / MILLION,
        cached_input=Decimal(q.cached_input) * unit.cached_input / MILLION,
        output=Decimal(q.output) * unit.output / MILLION,
        cache_write=Decimal(q.cache_write) * unit.cache_write / MILLION,
        cache_write_1h=Decimal(q.cache_write_1h) * unit.cache_write_1h / MILLION,
        request=Decimal(q.request) * unit.request,
        web_search=Decimal(q.web_search) * unit.web_search / THOUSAND,
    )


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """The unit prices one call was priced at (a resolved `Rates` set plus the fees)."""

    version: str
    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal = ZERO
    cache_write_1h: Decimal = ZERO
    request: Decimal = ZERO
    web_search: Decimal = ZERO
    tier: str = ""
    # Worked out once per price, not per call: the cost of no units of each dimension (a Decimal zero with the
    # exponent the formula gives it, so a sum keeps its exact form) and of the one request of a call.
    none: Cost = field(init=False, repr=False, compare=False)
    one_request: Decimal = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "none", _formula(self, Quantities()))
        object.__setattr__(self, "one_request", _formula(self, Quantities(request=1)).request)

    def of(self, dimension: str) -> Decimal:
        return getattr(self, dimension)


class Counts(Protocol):
    """What a call reports: a UsageEvent, the proxy's TokenUsage or UsageDraft all have these."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    web_search_requests: int


class Priced(NamedTuple):
    """The outcome of pricing one event. `unit is None` means no price was in force: held as unpriced."""

    unit: UnitPrice | None
    cost: Cost


@dataclass(frozen=True, slots=True)
class PriceSet:
    """One catalog entry, resolved: its version and the UnitPrice of each set of rates."""

    version: str
    base: UnitPrice
    long_context: tuple[int, UnitPrice] | None = None  # (above_prompt_tokens, prices)
    tiers: dict[str, UnitPrice] = field(default_factory=dict)
    tiers_long_context: dict[str, UnitPrice] = field(default_factory=dict)  # a tier's own long-context rates

    def select(self, service_tier: str, prompt_tokens: int) -> UnitPrice:
        """The rates a call is priced at (see the module doc)."""
        lc = self.long_context
        if lc is not None and prompt_tokens > lc[0]:
            return (self.tiers_long_context.get(service_tier) if service_tier else None) or lc[1]
        tier = self.tiers.get(service_tier) if service_tier else None
        return self.base if tier is None else tier

    # The base rates, read off the set as off a UnitPrice (callers that price a call use `select`).
    input = property(lambda self: self.base.input)
    output = property(lambda self: self.base.output)
    cached_input = property(lambda self: self.base.cached_input)
    cache_write = property(lambda self: self.base.cache_write)
    cache_write_1h = property(lambda self: self.base.cache_write_1h)
    request = property(lambda self: self.base.request)
    web_search = property(lambda self: self.base.web_search)
    none = property(lambda self: self.base.none)
    one_request = property(lambda self: self.base.one_request)

    def units(self) -> Iterator[UnitPrice]:
        yield self.base
        if self.long_context is not None:
            yield self.long_context[1]
        yield from self.tiers.values()
        yield from self.tiers_long_context.values()

    def worst_case_usd(self, prompt_tokens: int, completion_tokens: int, web_searches: int = 0) -> Decimal:
        """The most a call of these counts can cost at any of the rates (a quota reservation): its tokens at the
        dearest rates, the request fee, and the fees of `web_searches` searches (the fees are every set's)."""
        most_in = max(max(u.input, u.cache_write, u.cache_write_1h, u.cached_input) for u in self.units())
        most_out = max(u.output for u in self.units())
        fees = self.base.request + (Decimal(web_searches) * self.base.web_search / THOUSAND if web_searches else ZERO)
        return (Decimal(prompt_tokens) * most_in + Decimal(completion_tokens) * most_out) / MILLION + fees


def _digits(d: Decimal) -> str:
    return format(d.normalize(), "f")  # 2, 2.0 and 2.00 are one price


def _resolved(r: Rates) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal]:
    """(input, output, cached_input, cache_write, cache_write_1h) with the defaults filled in."""

    def inp(x: Decimal | None) -> Decimal:
        return r.input if x is None else x

    return r.input, r.output, inp(r.cached_input), inp(r.cache_write), inp(r.cache_write_1h)


def _hashed(p: Price) -> str:
    """What the version hashes. An entry that sets none of the later dimensions (or sets them to what they
    default to) hashes `input|output|cached_input` exactly as before they existed, so the versions of every
    recorded price stay the same; every other unit price joins the text when it moves a cost."""
    inp, out, cached, cw, cw1h = _resolved(p)
    parts = [_digits(inp), _digits(out), _digits(cached)]
    if cw != inp:
        parts.append(f"cache_write={_digits(cw)}")
    if cw1h != inp:
        parts.append(f"cache_write_1h={_digits(cw1h)}")
    if p.request:
        parts.append(f"request={_digits(p.request)}")
    if p.web_search:
        parts.append(f"web_search={_digits(p.web_search)}")
    if p.long_context is not None:
        lc = p.long_context
        parts.append(f"long_context>{lc.above_prompt_tokens}=" + ",".join(map(_digits, _resolved(lc))))
    for name in sorted(p.service_tiers):
        t = p.service_tiers[name]
        parts.append(f"tier {name}=" + ",".join(map(_digits, _resolved(t))))
        if t.long_context is not None:  # joins the text only when set: older versions keep their hash
            parts.append(f"tier {name} long_context=" + ",".join(map(_digits, _resolved(t.long_context))))
    return "|".join(parts)


def price_identity(p: Price) -> str:
    """What a price is, in every dimension (what its version hashes): equal for two entries exactly when they
    price every call the same (the import compares catalog and book with it)."""
    return _hashed(p)


def price_set(model: str, provider: str, p: Price) -> PriceSet:
    """The config entry as priced; the version hashes every unit price (see `_hashed`)."""
    digest = hashlib.sha256(_hashed(p).encode()).hexdigest()[:8]
    version = f"{model}/{provider}@{p.effective_from.isoformat()}#{digest}"
    fees = (ZERO if p.request is None else p.request, ZERO if p.web_search is None else p.web_search)

    def unit(r: Rates, tier: str) -> UnitPrice:
        inp, out, cached, cw, cw1h = _resolved(r)
        return UnitPrice(version, inp, out, cached, cw, cw1h, *fees, tier=tier)

    lc = p.long_context
    return PriceSet(
        version,
        unit(p, ""),
        None if lc is None else (lc.above_prompt_tokens, unit(lc, LONG_CONTEXT)),
        {name: unit(r, name) for name, r in p.service_tiers.items()},
        # a tier's long-context rates only count with a threshold to be above
        {name: unit(r.long_context, TIER_LONG_CONTEXT.format(name)) for name, r in p.service_tiers.items()
         if r.long_context is not None and lc is not None},
    )  # fmt: skip


def unit_price(model: str, provider: str, p: Price) -> UnitPrice:
    """The entry's base rates as priced (the version covers every set)."""
    return price_set(model, provider, p).base


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    model: str
    provider: str  # "*" for the model's own prices, else the route's provider
    effective_from: date
    prices: PriceSet
    identity: str = ""  # what its version hashes (price_identity), recorded with it (schemas/price_versions.py)

    @property
    def unit(self) -> UnitPrice:
        return self.prices.base


def catalog(config: GatewayConfig) -> Iterator[CatalogEntry]:
    """Every price entry of the config, as PriceBook prices with it. Route prices override the model's."""
    for name, m in config.models.items():
        lists = {"*": m.prices} | {r.provider: r.prices for r in m.routes if r.prices}  # a later route wins
        for provider, prices in lists.items():
            for p in sorted(prices, key=lambda p: p.effective_from):
                yield CatalogEntry(name, provider, p.effective_from, price_set(name, provider, p), price_identity(p))


class PriceBook:
    """Lookup of (model, provider, time) -> PriceSet. Route prices override the model's."""

    def __init__(self, config: GatewayConfig) -> None:
        self._table: dict[tuple[str, str], list[PriceSet]] = {}
        self._dates: dict[tuple[str, str], list[date]] = {}
        for e in catalog(config):
            self._dates.setdefault((e.model, e.provider), []).append(e.effective_from)
            self._table.setdefault((e.model, e.provider), []).append(e.prices)

    def at(self, model: str, provider: str, when: datetime) -> PriceSet | None:
        key = (model, provider) if (model, provider) in self._table else (model, "*")
        entries = self._table.get(key)
        if not entries:
            return None
        day = when.date()
        found = None
        for d, entry in zip(self._dates[key], entries, strict=True):
            if d <= day:
                found = entry
            else:
                break
        return found


def quantities(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
    web_search_requests: int = 0,
    requests: int = 1,
) -> Quantities:
    """A call's billed units: the input parts carved out of prompt_tokens (clipped, see the module doc)."""
    # (conditionals, not min(): this runs on every priced call)
    cached = cached_tokens if cached_tokens < prompt_tokens else prompt_tokens
    rest = prompt_tokens - cached
    cw = cache_write_tokens if cache_write_tokens < rest else rest
    rest -= cw
    cw1h = cache_write_1h_tokens if cache_write_1h_tokens < rest else rest
    return Quantities(rest - cw1h, cached, cw, cw1h, completion_tokens, requests, web_search_requests)


def cost_at(unit: UnitPrice, q: Quantities) -> Cost:
    """Exact Decimal cost of these quantities at these unit prices (a call's, or a sum of calls'): `_formula`,
    equal to it Decimal for Decimal (tests/unit/test_price_dimensions.py), with no Decimal work for a
    dimension the call does not use (most calls use two or three of the seven)."""
    none = unit.none
    return Cost(
        Decimal(q.input) * unit.input / MILLION if q.input else none.input,
        Decimal(q.cached_input) * unit.cached_input / MILLION if q.cached_input else none.cached_input,
        Decimal(q.output) * unit.output / MILLION if q.output else none.output,
        Decimal(q.cache_write) * unit.cache_write / MILLION if q.cache_write else none.cache_write,
        Decimal(q.cache_write_1h) * unit.cache_write_1h / MILLION if q.cache_write_1h else none.cache_write_1h,
        unit.one_request if q.request == 1 else Decimal(q.request) * unit.request,
        Decimal(q.web_search) * unit.web_search / THOUSAND if q.web_search else none.web_search,
    )


def cost_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int, unit: UnitPrice) -> Cost:
    """The cost of a call that reports no cache writes and no web searches (kept for older callers)."""
    return cost_at(unit, quantities(prompt_tokens, completion_tokens, cached_tokens))


def price(event: UsageEvent, book: PriceBook) -> Priced:
    """Cost of one event. Cache hits and rejections cost nothing but are still priced (version kept)."""
    return price_usage(book, billed_model(event.served_model, event.requested_model), event.provider,
                       event.occurred_at, event.status, event, event.service_tier)  # fmt: skip


def price_usage(book: PriceBook, model: str, provider: str, when: datetime, status: str, counts: Counts,
                service_tier: str = "") -> Priced:  # fmt: skip
    """Price one call from its counts, without the meter: the proxy's provisional cost (its TokenUsage or
    UsageDraft are `Counts`) and the meter's stored cost are this same function.

    model: the billed model (served, else requested: schemas.billed.billed_model); provider: the route's
    provider ('' when none answered); when: the call's occurred_at (UTC); status: ok | error | cached |
    rejected (only ok and error cost money); service_tier: what the provider says it served ('' unknown).
    Returns Priced(unit=None) when no price is in force for a call with tokens (the meter holds it)."""
    return price_of(model, provider, when, status, counts.prompt_tokens, counts.completion_tokens,
                    counts.cached_tokens, book, counts.cache_write_tokens, counts.cache_write_1h_tokens,
                    counts.web_search_requests, service_tier)  # fmt: skip


_ZERO_COST = Cost(ZERO, ZERO, ZERO)
_NO_PRICE_NEEDED = UnitPrice("none", ZERO, ZERO, ZERO)


def price_of(model: str, provider: str, occurred_at: datetime, status: str, prompt_tokens: int,
             completion_tokens: int, cached_tokens: int, book: PriceBook, cache_write_tokens: int = 0,
             cache_write_1h_tokens: int = 0, web_search_requests: int = 0, service_tier: str = "") -> Priced:  # fmt: skip
    """`price` on plain values (the meter's hot path prices decoded dicts without building models)."""
    entry = book.at(model, provider, occurred_at)
    has_tokens = bool(prompt_tokens or completion_tokens)
    if entry is None:
        # A call with no tokens (rejected, failed before upstream) needs no price to be exact.
        return Priced(None, _ZERO_COST) if has_tokens else Priced(_NO_PRICE_NEEDED, _ZERO_COST)
    unit = entry.select(service_tier, prompt_tokens)
    if status not in BILLABLE_STATUSES:  # a cache hit or a rejection
        return Priced(unit, _ZERO_COST)
    # The request fee is for a call the provider served (it has tokens), not for one that failed before it.
    q = quantities(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens,
                   web_search_requests, 1 if has_tokens else 0)  # fmt: skip
    return Priced(unit, cost_at(unit, q))
