"""The catalogs `tollway prices` reads, as schemas.price_catalog.Lookup: the `genai-prices` package's bundled
data (offline, the version locked in requirements.lock) and a LiteLLM `model_prices_and_context_window.json`.

Both keep exact Decimals: genai-prices holds Decimals already; the LiteLLM file is parsed with every JSON
number read as a Decimal (never a float), then scaled from per token to per 1M tokens.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from schemas.price_catalog import CatalogModel, CatalogPrice, Lookup

MILLION = Decimal(1_000_000)


class CatalogError(ValueError):
    """A catalog that cannot be read, phrased for the operator."""


# ---- genai-prices -------------------------------------------------------------------------------------

_HELD = {"input_mtok": "input", "output_mtok": "output", "cache_read_mtok": "cached_input"}


def _genai_price(start: Any, mp: Any) -> CatalogPrice | str:
    values: dict[str, Decimal] = {}
    unheld = []
    for key, v in mp.__dict__.items():
        if key.startswith("_") or v is None:
            continue
        if key not in _HELD:
            unheld.append(key)
            continue
        if hasattr(v, "tiers"):  # TieredPrices: the base price holds below the first tier
            tiers = ", ".join(f"{format(t.price, 'f')} above {t.start} input tokens" for t in v.tiers)
            unheld.append(f"{key} tiers ({tiers}; the base price is imported)")
            v = v.base
        values[_HELD[key]] = v
    if "input" not in values:
        return "no input token price"
    return CatalogPrice(start, values["input"], values.get("output", Decimal(0)), values.get("cached_input"),
                        tuple(unheld))  # fmt: skip


def _genai_model(provider: Any, model: Any) -> CatalogModel:
    name = f"{provider.id}/{model.id}"
    conditional = model.prices if isinstance(model.prices, list) else None
    unheld = tuple(
        "variant " + ",".join(f"{k}={v}" for k, v in variant.when.items())
        for variant in model.price_variants or ()
        if any(v is not None for k, v in variant.prices.__dict__.items() if not k.startswith("_"))
    )
    if conditional is None:
        periods = [(None, model.prices)]
    else:
        kinds = {type(c.constraint).__name__ for c in conditional if c.constraint is not None}
        if kinds - {"StartDateConstraint"}:
            return CatalogModel(
                name, (), unheld, refused="time-of-day prices (e.g. off-peak), which the book cannot hold"
            )
        periods = [(c.constraint.start_date if c.constraint else None, c.prices) for c in conditional]
    prices = []
    for start, mp in sorted(periods, key=lambda p: (p[0] is not None, p[0])):
        got = _genai_price(start, mp)
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
_LITELLM_HELD = {"input_cost_per_token": "input", "output_cost_per_token": "output",
                 "cache_read_input_token_cost": "cached_input"}  # fmt: skip


def _per_million(key: str, v: object) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, Decimal | int):
        raise CatalogError(f"{key} is not a number: {v!r}")
    d = Decimal(v) * MILLION
    if not d.is_finite() or d < 0:
        raise CatalogError(f"{key} is not a finite non-negative number: {v!r}")
    return d


def _litellm_model(name: str, entry: dict[str, Any]) -> CatalogModel:
    values: dict[str, Decimal] = {}
    unheld = []
    try:
        for key, v in entry.items():
            if key in _LITELLM_HELD:
                values[_LITELLM_HELD[key]] = _per_million(key, v)
            elif "cost" in key and v not in (0, None, {}):
                unheld.append(key)
    except CatalogError as err:
        return CatalogModel(name, (), refused=str(err))
    if "input" not in values:
        return CatalogModel(name, (), refused="no input_cost_per_token")
    price = CatalogPrice(None, values["input"], values.get("output", Decimal(0)), values.get("cached_input"))
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
