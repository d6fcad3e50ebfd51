"""Outside price catalogs against the book: which catalog model prices a configured model, and what to add.

Pure: a catalog is plain data (schemas.price_catalog.CatalogModel), read by tollway/price_sources.py. The plan
only ever adds effective-dated entries to a model's `prices:` list; a price in force is never rewritten (see
schemas/price_versions.py), and a new entry dated in the past is refused for a model that already has a price
in force, since it would reprice billed usage (corrections go through `tollway rerate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from schemas.config import GatewayConfig, LongContext, ModelConfig, Price, Rates
from schemas.prices import price_identity

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class CatalogPrice:
    """One catalog price in the book's dimensions (USD per 1M tokens; request per call, web_search per 1,000),
    from `start` (None: since always)."""

    start: date | None
    input: Decimal
    output: Decimal = ZERO
    cached_input: Decimal | None = None
    unheld: tuple[str, ...] = ()  # catalog dimensions the book cannot hold (audio, storage, several tiers, ...)
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    request: Decimal | None = None
    web_search: Decimal | None = None
    long_context: LongContext | None = None
    service_tiers: tuple[tuple[str, Rates], ...] = ()  # (tier name, rates), by name

    def as_price(self, effective_from: date) -> Price:
        return Price(effective_from=effective_from, input=self.input, output=self.output,
                     cached_input=self.cached_input, cache_write=self.cache_write, cache_write_1h=self.cache_write_1h,
                     request=self.request, web_search=self.web_search, long_context=self.long_context,
                     service_tiers=dict(self.service_tiers))  # fmt: skip


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """A catalog's prices for one model, oldest first. `refused` says why none can be imported."""

    name: str  # as the catalog names it, e.g. `openai/gpt-4.1`
    prices: tuple[CatalogPrice, ...]
    unheld: tuple[str, ...] = ()  # model-wide: variants (service tiers, batch) the book cannot hold
    refused: str | None = None

    def at(self, day: date) -> CatalogPrice | None:
        found = None
        for p in self.prices:
            if p.start is None or p.start <= day:
                found = p
        return found

    def from_day(self, day: date) -> list[CatalogPrice]:
        """The price in force on `day` and every one scheduled after it."""
        current = self.at(day)
        return [p for p in self.prices if p is current or (p.start is not None and p.start > day)]


@dataclass(frozen=True, slots=True)
class Lookup:
    """A catalog as the planner sees it: `find(name, provider, base_url)` for a route's upstream model,
    `exact(catalog_name)` for `--map`. Both return None when the catalog has no such model."""

    source: str  # e.g. `genai-prices 0.2.3`
    find: Callable[[str, str, str], CatalogModel | None]
    exact: Callable[[str], CatalogModel | None]


def candidates(name: str, m: ModelConfig, config: GatewayConfig) -> Iterator[tuple[str, str, str]]:
    """(catalog name to try, provider key, provider base_url), best first: what each route actually calls
    upstream (in priority order), then the public name and its aliases on the primary route's provider."""
    routes = sorted(m.routes, key=lambda r: r.priority)  # stable: list order breaks ties
    for r in routes:
        yield r.model or name, r.provider, config.providers[r.provider].base_url
    first = routes[0]
    for n in (name, *m.aliases):
        yield n, first.provider, config.providers[first.provider].base_url


def match(name: str, config: GatewayConfig, lookup: Lookup, mapped: dict[str, str]) -> CatalogModel | None:
    if name in mapped:
        if (found := lookup.exact(mapped[name])) is None:
            raise ValueError(f"--map {name}={mapped[name]}: {lookup.source} has no such model")
        return found
    for ref, provider, base_url in candidates(name, config.models[name], config):
        if (found := lookup.find(ref, provider, base_url)) is not None:
            return found
    return None


def book_at(prices: list[Price], day: date) -> Price | None:
    found = None
    for p in sorted(prices, key=lambda p: p.effective_from):
        if p.effective_from <= day:
            found = p
    return found


def same(a: Price, b: Price) -> bool:
    """The same price in every dimension: what the version hash covers (schemas/prices.py price_identity), so
    2 and 2.00 are one price and an unset cache price equals one set to input."""
    return price_identity(a) == price_identity(b)


def _d(x: Decimal) -> str:
    return format(x, "f")


def _rates_text(r: Rates) -> str:
    parts = [f"input {_d(r.input)}", f"output {_d(r.output)}"]
    parts += [f"{name} {_d(v)}" for name in ("cached_input", "cache_write", "cache_write_1h")
              if (v := getattr(r, name)) is not None]  # fmt: skip
    return " ".join(parts)


def show(p: Price | None) -> str:
    if p is None:
        return "none"
    parts = [_rates_text(p)]
    if p.request is not None:
        parts.append(f"request {_d(p.request)}")
    if p.web_search is not None:
        parts.append(f"web_search {_d(p.web_search)}/1K")
    if p.long_context is not None:
        parts.append(f"above {p.long_context.above_prompt_tokens} prompt tokens: {_rates_text(p.long_context)}")
    parts += [f"tier {name}: {_rates_text(r)}" for name, r in sorted(p.service_tiers.items())]
    return "; ".join(parts) + f" from {p.effective_from}"


@dataclass
class ModelPlan:
    """What the import does for one configured model."""

    model: str
    catalog: str | None  # the catalog model it mapped to; None: not in the catalog
    current: Price | None  # the book's price in force today
    add: list[Price] = field(default_factory=list)
    unheld: list[str] = field(default_factory=list)
    problem: str | None = None  # a refusal: nothing is written while any model has one
    note: str | None = None  # why nothing is added, when not a problem


def plan_model(name: str, m: ModelConfig, found: CatalogModel | None, today: date,
               effective_from: date | None) -> ModelPlan:  # fmt: skip
    out = ModelPlan(name, found.name if found else None, book_at(m.prices, today))
    if found is None:
        out.note = "not in the catalog (use --map PUBLIC=CATALOG_NAME)"
        return out
    if found.refused:
        out.note = f"not imported: {found.refused}"
        return out
    if effective_from is not None:
        wanted = [(effective_from, p) for p in [found.at(effective_from)] if p is not None]
    else:
        # the catalog's own start date, else today (a catalog price with no date is simply "now"); a catalog
        # price in force since a past day, for a model priced today, from today (a past date would reprice
        # billed usage: that takes an explicit --effective-from, refused below)
        def day_of(p: CatalogPrice) -> date:
            if p.start is None or (p.start < today and out.current is not None):
                return today
            return p.start

        wanted = [(day_of(p), p) for p in found.from_day(today)]
    if not wanted:
        out.note = f"the catalog has no price for {name} on that date"
        return out
    book = list(m.prices)
    in_force = out.current is not None
    for day, cp in wanted:
        new = cp.as_price(day)
        out.unheld.extend(u for u in (*found.unheld, *cp.unheld) if u not in out.unheld)
        there = book_at(book, day)
        if there is not None and same(there, new):
            continue
        if day < today and (now := book_at(book, today)) is not None and same(now, new):
            continue  # the catalog's price since a past day is the book's today: nothing to add
        if there is not None and there.effective_from == day:
            out.problem = (f"the book already has a different price dated {day} ({show(there)}); an import "
                           f"only adds entries: edit it by hand or import with another --effective-from")  # fmt: skip
            return out
        if day < today and in_force:
            out.problem = (f"an entry dated {day} (the past) would reprice billed usage of a model with a price "
                           f"in force: use --effective-from with a date >= {today}, then `tollway rerate "
                           f"--period YYYY-MM` for the months it should correct")  # fmt: skip
            return out
        out.add.append(new)
        book.append(new)
    if not out.add:
        out.note = "up to date"
    return out


def plan(config: GatewayConfig, lookup: Lookup, today: date, effective_from: date | None = None,
         mapped: dict[str, str] | None = None) -> list[ModelPlan]:  # fmt: skip
    mapped = mapped or {}
    unknown = sorted(set(mapped) - set(config.models))
    if unknown:
        raise ValueError(f"--map names models that are not configured: {', '.join(unknown)}")
    return [plan_model(name, m, match(name, config, lookup, mapped), today, effective_from)
            for name, m in config.models.items()]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Finding:
    model: str
    status: str  # ok | missing | stale | unchecked
    detail: str


def check(config: GatewayConfig, lookup: Lookup, today: date, mapped: dict[str, str] | None = None) -> list[Finding]:
    """Per model: `missing` (no price in force today), `stale` (the catalog's newest price, or the one in
    force today, is not what the book has on that date), `unchecked` (priced, but not in the catalog), `ok`."""
    out = []
    for name, m in config.models.items():
        found = match(name, config, lookup, mapped or {})
        current = book_at(m.prices, today)
        routes = [r.provider for r in m.routes if r.prices]
        by_hand = f"; route prices ({', '.join(routes)}) are not checked" if routes else ""
        if current is None:
            out.append(Finding(name, "missing", f"no price in force on {today}{by_hand}"))
            continue
        if found is None or found.refused:
            why = "not in the catalog" if found is None else found.refused
            out.append(Finding(name, "unchecked", f"{why}; the book has {show(current)}{by_hand}"))
            continue
        stale = []
        for cp in found.from_day(today):
            day = cp.start if cp.start and cp.start > today else today
            there = book_at(m.prices, day)
            if there is None or not same(there, cp.as_price(day)):
                when = f"from {cp.start}" if cp.start else "(no start date)"
                stale.append(f"{found.name} {when}: {show(cp.as_price(day)).rsplit(' from ', 1)[0]}; "
                             f"the book on {day}: {show(there)}")  # fmt: skip
        if stale:
            out.append(Finding(name, "stale", "; ".join(stale) + by_hand))
        else:
            out.append(Finding(name, "ok", f"{show(current)} matches {found.name}{by_hand}"))
    return out
