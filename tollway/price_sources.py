"""The catalogs `tollway prices` reads, as schemas.price_catalog.Lookup: the `genai-prices` package's bundled
data (offline, the version locked in requirements.lock) and a LiteLLM `model_prices_and_context_window.json`.

Both keep exact Decimals: genai-prices holds Decimals already; the LiteLLM file is parsed with every JSON
number read as a Decimal (never a float), then scaled from per token to per 1M tokens.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from schemas.config import LongContext, Rates
from schemas.price_catalog import CatalogModel, CatalogPrice, Lookup

MILLION = Decimal(1_000_000)


class CatalogError(ValueError):
    """A catalog that cannot be read, phrased for the operator."""


# ---- genai-prices -------------------------------------------------------------------------------------

# genai-prices key -> (the book's dimension, the factor from the catalog's unit to the book's)
_HELD = {"input_mtok": ("input", 1), "output_mtok": ("output", 1), "cache_read_mtok": ("cached_input", 1),
         "cache_write_mtok": ("cache_write", 1), "cache_write_1h_mtok": ("cache_write_1h", 1),
         "web_searches_kcount": ("web_search", 1), "requests_kcount": ("request", Decimal("0.001"))}  # fmt: skip
_RATES = ("input", "output", "cached_input", "cache_write", "cache_write_1h")


def _flat(values: dict[str, Any], unheld: list[str], what: str) -> dict[str, Decimal]:
    """Tiered prices (genai-prices TieredPrices) at their base, for a set that cannot switch tiers itself."""
    out = {}
    for k, v in values.items():
        if hasattr(v, "tiers"):
            unheld.append(f"{what} {k} tiers (the base price is imported)")
            v = v.base
        out[k] = v
    return out


def _genai_values(mp: Any, unheld: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, v in mp.__dict__.items():
        if key.startswith("_") or v is None:
            continue
        if key not in _HELD:
            unheld.append(key)
            continue
        name, factor = _HELD[key]
        if hasattr(v, "tiers"):
            if name not in _RATES:
                unheld.append(f"{key} tiers (the base price is imported)")
                v = v.base
        else:
            v = v * factor if factor != 1 else v
        values[name] = v
    return values


def _long_context(values: dict[str, Any], unheld: list[str]) -> tuple[dict[str, Decimal], LongContext | None]:
    """genai-prices' token tiers as the book's long-context tier: one threshold shared by every tiered price
    ("crossing a tier applies that rate to ALL tokens", as the book prices it). Anything else: the base."""
    tiered = {k: v for k, v in values.items() if hasattr(v, "tiers")}
    base = {k: (v.base if k in tiered else v) for k, v in values.items()}
    if not tiered:
        return base, None
    starts = {t.start for v in tiered.values() for t in v.tiers}
    if len(starts) != 1 or any(len(v.tiers) != 1 for v in tiered.values()) or "input" not in base:
        unheld.append("token tiers other than one shared threshold (the base prices are imported)")
        return base, None
    (start,) = starts
    rates = {k: (tiered[k].tiers[0].price if k in tiered else base[k]) for k in _RATES if k in base}
    return base, LongContext(above_prompt_tokens=start, **rates)


def _genai_price(start: Any, mp: Any, tiers: tuple[tuple[str, Any], ...] = ()) -> CatalogPrice | str:
    unheld: list[str] = []
    values, lc = _long_context(_genai_values(mp, unheld), unheld)
    if "input" not in values:
        return "no input token price"
    service_tiers = []
    for name, variant in tiers:
        # A variant overrides the standard prices key by key (genai-prices ModelInfo.get_prices).
        own = _flat(_genai_values(variant, unheld), unheld, f"tier {name}")
        rates = {k: own.get(k, values.get(k)) for k in _RATES if k in own or k in values}
        service_tiers.append((name, Rates(**rates)))
    return CatalogPrice(start, values["input"], values.get("output", Decimal(0)), values.get("cached_input"),
                        tuple(unheld), values.get("cache_write"), values.get("cache_write_1h"), values.get("request"),
                        values.get("web_search"), lc, tuple(sorted(service_tiers, key=lambda t: t[0])))  # fmt: skip


def _tier_variants(model: Any) -> tuple[list[tuple[Any, str, Any]], tuple[str, ...]]:
    """(start date or None, tier name, prices) of the variants the event's service_tier selects, and the others
    as unheld: the event names the tier the provider served; batch processing and other contexts it cannot."""
    tiers, unheld = [], []
    for variant in model.price_variants or ():
        if not any(v is not None for k, v in variant.prices.__dict__.items() if not k.startswith("_")):
            continue  # the standard prices under another name (service_tier "default")
        start = variant.constraint.start_date if variant.constraint is not None else None
        if set(variant.when) == {"service_tier"}:
            tiers.append((start, variant.when["service_tier"], variant.prices))
        else:
            unheld.append("variant " + ",".join(f"{k}={v}" for k, v in variant.when.items()))
    return tiers, tuple(unheld)


def _genai_model(provider: Any, model: Any) -> CatalogModel:
    name = f"{provider.id}/{model.id}"
    conditional = model.prices if isinstance(model.prices, list) else None
    variants, unheld = _tier_variants(model)
    if conditional is None:
        periods = [(None, model.prices)]
    else:
        kinds = {type(c.constraint).__name__ for c in conditional if c.constraint is not None}
        if kinds - {"StartDateConstraint"}:
            return CatalogModel(
                name, (), unheld, refused="time-of-day prices (e.g. off-peak), which the book cannot hold"
            )
        periods = [(c.constraint.start_date if c.constraint else None, c.prices) for c in conditional]
    periods.sort(key=lambda p: (p[0] is not None, p[0]))
    # A tier that starts later begins a new period with the standard prices then in force.
    starts = sorted({p[0] for p in periods if p[0] is not None} | {v[0] for v in variants if v[0] is not None})
    days: list[Any] = [None, *starts] if periods[0][0] is None else starts
    prices = []
    for day in days:
        mp = [m for s, m in periods if s is None or (day is not None and s <= day)]
        if not mp:
            continue
        tiers = tuple((n, v) for s, n, v in variants if s is None or (day is not None and s <= day))
        got = _genai_price(day, mp[-1], tiers)
        if isinstance(got, str):
            return CatalogModel(name, (), unheld, refused=got)
        prices.append(got)
    return CatalogModel(name, tuple(prices), unheld)


def genai_prices() -> Lookup:
    import genai_prices
    from genai_prices import data_snapshot

    snap = data_snapshot.get_snapshot()

    def provider_for(key: str, base_url: str) -> Any:
        for by_url, by_id in ((base_url, None), (None, key)):  # the URL says who is called; the key is a name
            try:
                return snap.find_provider(None, by_id, by_url)
            except LookupError:
                continue
        return None

    def find(name: str, provider: str, base_url: str) -> CatalogModel | None:
        p = provider_for(provider, base_url)
        model = p.find_model(name, all_providers=snap.providers) if p is not None else None
        return _genai_model(p, model) if model is not None else None

    def exact(catalog_name: str) -> CatalogModel | None:
        # `provider/model` (a provider id of genai-prices), or a model reference it resolves alone
        head, _, rest = catalog_name.partition("/")
        if rest and (p := provider_for(head, "")) is not None:
            if (model := p.find_model(rest, all_providers=snap.providers)) is not None:
                return _genai_model(p, model)
        try:
            p, model = snap.find_provider_model(catalog_name, None, None, None)
        except LookupError:
            return None
        return _genai_model(p, model)

    return Lookup(f"genai-prices {genai_prices.__version__}", find, exact)


# ---- LiteLLM's model_prices_and_context_window.json ---------------------------------------------------

# Tollway provider key -> the `litellm_provider` values whose prices it pays (LiteLLM names Gemini's API
# `gemini` and Vertex AI `vertex_ai-*`, which can price differently). Other keys match themselves; --map
# covers the rest.
LITELLM_PROVIDERS = {
    "openai": ("openai", "text-completion-openai"),
    "google": ("gemini",),
    "bedrock": ("bedrock", "bedrock_converse"),
}
# LiteLLM per-token keys -> the book's rates. A rate key may end in `_above_<N>k_tokens` (the long-context tier
# above N thousand prompt tokens) or `_<tier>` for a service tier (flex, priority).
_LITELLM_RATES = {"input_cost_per_token": "input", "output_cost_per_token": "output",
                  "cache_read_input_token_cost": "cached_input", "cache_creation_input_token_cost": "cache_write",
                  "cache_creation_input_token_cost_above_1hr": "cache_write_1h"}  # fmt: skip
_LITELLM_TIERS = ("flex", "priority")
_ABOVE = re.compile(r"^(?P<key>.+)_above_(?P<k>\d+)k_tokens$")


def _per_million(key: str, v: object) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, Decimal | int):
        raise CatalogError(f"{key} is not a number: {v!r}")
    d = Decimal(v) * MILLION
    if not d.is_finite() or d < 0:
        raise CatalogError(f"{key} is not a finite non-negative number: {v!r}")
    return d


def _rate_key(key: str) -> tuple[str, int | None, str | None] | None:
    """(the book's rate, long-context threshold, service tier) a LiteLLM key prices, or None."""
    if key in _LITELLM_RATES:
        return _LITELLM_RATES[key], None, None
    if (m := _ABOVE.match(key)) and m["key"] in _LITELLM_RATES:
        return _LITELLM_RATES[m["key"]], int(m["k"]) * 1000, None
    for tier in _LITELLM_TIERS:
        if key.endswith(f"_{tier}") and key[: -len(tier) - 1] in _LITELLM_RATES:
            return _LITELLM_RATES[key[: -len(tier) - 1]], None, tier
    return None


def _web_search(v: object) -> Decimal | None:
    """`search_context_cost_per_query` (USD per search by context size) as USD per 1,000 searches, when one
    price holds for every size (the event does not say which size a search used)."""
    if not isinstance(v, dict) or not v:
        return None
    prices = {_per_million("search_context_cost_per_query", x) for x in v.values()}
    return prices.pop() / 1000 if len(prices) == 1 else None


def _litellm_model(name: str, entry: dict[str, Any]) -> CatalogModel:
    values: dict[str, Decimal] = {}
    above: dict[int, dict[str, Decimal]] = {}
    tiers: dict[str, dict[str, Decimal]] = {}
    unheld = []
    web = None
    try:
        for key, v in entry.items():
            rate = _rate_key(key)
            if rate is not None:
                book, threshold, tier = rate
                target = (
                    values
                    if threshold is None and tier is None
                    else (above.setdefault(threshold, {}) if threshold is not None else tiers.setdefault(tier, {}))
                )  # type: ignore[arg-type]
                target[book] = _per_million(key, v)
            elif key == "search_context_cost_per_query" and (web := _web_search(v)) is not None:
                continue
            elif "cost" in key and v not in (0, None, {}):
                unheld.append(key)
    except CatalogError as err:
        return CatalogModel(name, (), refused=str(err))
    if "input" not in values:
        return CatalogModel(name, (), refused="no input_cost_per_token")
    lc = None
    if len(above) > 1:
        unheld.append("long-context prices above several thresholds (none imported)")
    elif above:
        ((threshold, rates),) = above.items()
        # A rate the tier does not name is the base one (as for a service tier below).
        lc = LongContext(above_prompt_tokens=threshold, **({k: v for k, v in values.items()} | rates))
    service_tiers = tuple((t, Rates(**(values | rates))) for t, rates in sorted(tiers.items()))
    price = CatalogPrice(None, values["input"], values.get("output", Decimal(0)), values.get("cached_input"), (),
                         values.get("cache_write"), values.get("cache_write_1h"), None, web, lc, service_tiers)  # fmt: skip
    return CatalogModel(name, (price,), tuple(sorted(unheld)))


def litellm(path: str | Path) -> Lookup:
    p = Path(path)
    try:
        data = json.loads(p.read_text(), parse_float=Decimal, parse_int=Decimal)
    except OSError as err:
        raise CatalogError(f"cannot read {p}: {err.strerror}") from None
    except (ValueError, InvalidOperation) as err:
        raise CatalogError(f"{p} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{p}: expected an object of model name -> prices (LiteLLM's format)")
    entries = {k: v for k, v in data.items() if isinstance(v, dict) and k != "sample_spec"}

    def find(name: str, provider: str, base_url: str) -> CatalogModel | None:
        accepted = LITELLM_PROVIDERS.get(provider, (provider,))
        for key in (*(f"{a}/{name}" for a in accepted), name):
            entry = entries.get(key)
            if entry is not None and entry.get("litellm_provider") in accepted:
                return _litellm_model(key, entry)
        return None

    def exact(catalog_name: str) -> CatalogModel | None:
        entry = entries.get(catalog_name)
        return _litellm_model(catalog_name, entry) if entry is not None else None

    return Lookup(f"litellm {p.name}", find, exact)
