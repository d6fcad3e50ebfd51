"""The gateway config file (`tollway.yaml`): providers, models with routes and prices, plans.

Loaded once at start; a bad file stops start-up with a message that names the offending field.
"""

from __future__ import annotations

import os
import re
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, phrased for the operator: file, field path and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Upper bounds for every limit and money field (API bodies, the config file, stored rows). A limit must
# survive every hop it takes: orjson encodes at most 64-bit ints, JavaScript (the dashboard, SDKs) counts
# exactly only up to 2^53 - 1, and ClickHouse keeps USD as Decimal. Beyond these there is no real plan:
# 2^53 requests a minute is "unlimited", and that is spelled by leaving the limit out.
MAX_COUNT = 2**53 - 1
MAX_USD = Decimal(1_000_000_000)  # USD per month (budgets, plan fees)
USD_PLACES = 6  # micro-dollars: finer than any price per token the catalog carries


def _count() -> Any:
    return Field(default=None, ge=1, le=MAX_COUNT)


def _usd() -> Any:
    return Field(default=None, ge=0, le=MAX_USD, decimal_places=USD_PLACES)


class Limits(_Strict):
    """Any subset; None means 'no limit at this level'."""

    rpm: int | None = _count()
    rpd: int | None = _count()
    tpm: int | None = _count()
    tokens_per_month: int | None = _count()
    budget_usd_per_month: Decimal | None = _usd()
    # Not a limit: one alert when a UTC day's spend crosses it (billing's alerts; never gates a call).
    daily_alert_usd: Decimal | None = _usd()

    @field_validator("rpm", "rpd", "tpm", "tokens_per_month", mode="before")
    @classmethod
    def _no_bool(cls, v: object) -> object:
        # pydantic reads true as 1: a limit of "true requests a minute" is a mistake, not a number.
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        return v

    def overlay(self, other: Limits | None) -> Limits:
        """`other`'s set fields win: a key's own limits override its plan's."""
        if other is None:
            return self
        return self.model_copy(update=other.model_dump(exclude_none=True))


class Plan(Limits):
    fee_usd_per_month: Decimal = Field(default=Decimal(0), ge=0, le=MAX_USD, decimal_places=USD_PLACES)
    models: list[str] | None = Field(default=None, description="public names or aliases a key may use; None = all")


def _decimal(v: object) -> object:
    # YAML turns 2.5 into a float; go through str so 0.1 stays exactly 0.1.
    return Decimal(str(v)) if isinstance(v, float) else v


class Rates(_Strict):
    """One set of token prices, USD per 1M tokens: a price's base set, a service tier's and a long-context tier's
    (schemas/prices.py resolves and applies them). An unset cache price is the set's `input`: what those tokens
    cost before the split existed (they are inside prompt_tokens), so an old entry prices every call as before."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(default=Decimal(0), ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0, description="cache reads; default input")
    cache_write: Decimal | None = Field(default=None, ge=0, description="5-minute cache writes; default input")
    cache_write_1h: Decimal | None = Field(default=None, ge=0, description="1-hour cache writes; default input")

    @field_validator("input", "output", "cached_input", "cache_write", "cache_write_1h", mode="before")
    @classmethod
    def _no_float(cls, v: object) -> object:
        return _decimal(v)


class LongContext(Rates):
    """Prices for a call whose prompt_tokens (all input, cache reads and writes included) exceed the threshold:
    the whole call is priced at these, as Anthropic and Google bill long prompts."""

    above_prompt_tokens: int = Field(ge=1, le=MAX_COUNT)


class TierRates(Rates):
    """A service tier's rates. Above the price's long-context threshold a tier is priced only at its own
    `long_context` rates (e.g. a batch discount on long prompts, as Anthropic stacks them); a tier without them
    is priced there at the price's long-context rates: providers publish tier rates for short prompts only
    (OpenAI's priority processing "excludes long context")."""

    long_context: Rates | None = None


class Price(Rates):
    """USD per 1M tokens (the `Rates`), per-call fees, and the tiers, in force from `effective_from` (UTC date)
    until the next entry. A service tier the event names (`service_tier`) picks its own rates; an unknown or
    empty tier is priced at the base rates. A prompt over the long-context threshold is priced at the
    long-context rates, or at its tier's own long-context rates when the tier has them (`TierRates`). The fees
    are per call and the same in every tier."""

    effective_from: date = date(2000, 1, 1)
    request: Decimal | None = Field(default=None, ge=0, description="USD per billable request; default 0")
    web_search: Decimal | None = Field(default=None, ge=0, description="USD per 1,000 web searches; default 0")
    long_context: LongContext | None = None
    service_tiers: dict[str, TierRates] = Field(default_factory=dict, description="e.g. flex, priority, batch")

    @field_validator("request", "web_search", mode="before")
    @classmethod
    def _no_float_fee(cls, v: object) -> object:
        return _decimal(v)

    @field_validator("service_tiers", mode="before")
    @classmethod
    def _plain_rates(cls, v: object) -> object:
        # a tier given as plain `Rates` (the catalog import builds them) is a TierRates without long context
        if isinstance(v, dict):
            return {k: r.model_dump() if type(r) is Rates else r for k, r in v.items()}
        return v

    @field_validator("service_tiers")
    @classmethod
    def _tier_names(cls, v: dict[str, TierRates]) -> dict[str, TierRates]:
        for name in v:
            if not name or len(name) > 64:
                raise ValueError(f"a service tier name must have 1 to 64 characters, got {name!r}")
        return v


# The wire API a provider speaks, and the proxy endpoints each serves natively (one fact, one place: the
# config loader, the router and the docs all read this table). `openai_compatible` is a provider's OpenAI-shaped
# chat layer (Gemini, DeepSeek, Anthropic's compatibility endpoint): chat and embeddings, no Responses API.
ProviderApi = Literal["openai", "openai_compatible", "anthropic"]
Endpoint = Literal["chat.completions", "embeddings", "responses", "messages"]
ENDPOINT_KIND: dict[str, str] = {  # the model kind an endpoint serves
    "chat.completions": "chat",
    "embeddings": "embedding",
    "responses": "chat",
    "messages": "chat",
}
SERVED_BY: dict[str, frozenset[str]] = {  # endpoint -> the provider APIs that serve it natively
    "chat.completions": frozenset({"openai", "openai_compatible"}),
    "embeddings": frozenset({"openai", "openai_compatible"}),
    "responses": frozenset({"openai"}),
    "messages": frozenset({"anthropic"}),
}


def endpoints_of(api: str, kind: str) -> tuple[str, ...]:
    """The endpoints a provider of this API serves for a model of this kind, in ENDPOINT_KIND's order."""
    return tuple(e for e, k in ENDPOINT_KIND.items() if k == kind and api in SERVED_BY[e])


class Provider(_Strict):
    base_url: str
    api: ProviderApi = Field(default="openai", description="the wire API it speaks (see SERVED_BY)")
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    health_check_interval_s: float | None = Field(default=None, gt=0, description="None = passive health only")
    health_check_path: str = Field(default="/models", description="GET base_url + this path; 2xx = healthy")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Route(_Strict):
    provider: str
    model: str | None = Field(default=None, description="upstream model name; defaults to the public name")
    weight: float = Field(default=1.0, gt=0)
    priority: int = Field(default=0, description="lower tiers are tried first; routes in one tier share load")
    prices: list[Price] | None = Field(default=None, description="overrides the model's prices on this route")


class RetryConfig(_Strict):
    """Retries and fallbacks for one request: exponential backoff with full jitter, bounded twice."""

    max_attempts: int = Field(default=4, ge=1, description="upstream calls per request, all routes together")
    retries_per_route: int = Field(default=1, ge=0, description="extra tries on a route before falling back")
    backoff_base_s: float = Field(default=0.1, ge=0)
    backoff_max_s: float = Field(default=2.0, ge=0)
    deadline_s: float = Field(default=120.0, gt=0, description="for the whole request until the first byte")
    retry_after_max_s: float = Field(default=10.0, ge=0, description="longer upstream Retry-After: fall back/fail")


class HealthConfig(_Strict):
    """Passive health per route: a circuit breaker and a latency EWMA that biases load balancing."""

    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open the breaker")
    cooldown_s: float = Field(default=30.0, gt=0, description="open -> half-open (one probe request) after this")
    ewma_alpha: float = Field(default=0.3, gt=0, le=1)
    latency_bias: float = Field(default=1.0, ge=0, description="0 = weights only; 1 = weight / relative latency")


class CacheConfig(_Strict):
    """Exact-match response cache, in process memory."""

    enabled: bool = True
    ttl_s: float = Field(default=600.0, gt=0)
    max_entries: int = Field(default=10_000, ge=1)
    max_entry_bytes: int = Field(default=1_000_000, ge=1)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="all entries together")


# How the routes of one priority tier are ordered (services/proxy/balancer.py): `weighted` samples by weight,
# biased towards the faster route (latency EWMA); `cheapest` by the book's price for the request's expected
# tokens; `fastest` by the latency EWMA. Fallback tiers, breakers, cool-downs and retries work the same in all.
Routing = Literal["weighted", "cheapest", "fastest"]


class ModelConfig(_Strict):
    kind: Literal["chat", "embedding"] = "chat"
    endpoints: list[Endpoint] | None = Field(
        default=None,
        description="the proxy endpoints that serve it; default: every endpoint one of its routes speaks natively",
    )
    aliases: list[str] = Field(default_factory=list)
    routes: list[Route] = Field(min_length=1)
    prices: list[Price] = Field(default_factory=list)
    baseline: list[Price] | None = Field(
        default=None,
        description="what this traffic would cost elsewhere (ROI): one price, or a list of effective-dated ones",
    )
    retry: RetryConfig | None = Field(default=None, description="overrides the gateway's retry policy")
    cache_ttl_s: float | None = Field(default=None, ge=0, description="overrides cache.ttl_s; 0 = never cache")
    max_output_tokens: int | None = Field(default=None, ge=1, le=10_000_000,
                                          description="the model's output cap: a larger max_tokens is a 400")  # fmt: skip
    routing: Routing = Field(default="weighted", description="how routes of one priority tier are ordered")
    typical_output_tokens: int = Field(default=256, ge=0, le=10_000_000,
                                       description="`cheapest`: the output a request without max_tokens is "
                                                   "expected to produce")  # fmt: skip

    @field_validator("prices")
    @classmethod
    def _ordered(cls, v: list[Price]) -> list[Price]:
        dates = [p.effective_from for p in v]
        if len(set(dates)) != len(dates):
            raise ValueError("two prices share one effective_from date")
        return sorted(v, key=lambda p: p.effective_from)

    @field_validator("baseline", mode="before")
    @classmethod
    def _baseline_list(cls, v: object) -> object:
        # Today's single object (in force since `effective_from`, default 2000-01-01) is a list of one.
        return [v] if isinstance(v, dict | Price) else v

    @field_validator("baseline")
    @classmethod
    def _baseline_ordered(cls, v: list[Price] | None) -> list[Price] | None:
        if v is None:
            return None
        dates = [p.effective_from for p in v]
        if len(set(dates)) != len(dates):
            raise ValueError("two baseline prices share one effective_from date")
        return sorted(v, key=lambda p: p.effective_from)

    def baseline_at(self, day: date) -> Price | None:
        """The baseline price in force on a UTC day (the latest entry from on or before it), or None."""
        found = None
        for p in self.baseline or ():
            if p.effective_from <= day:
                found = p
        return found


class GatewayConfig(_Strict):
    providers: dict[str, Provider] = Field(min_length=1)
    models: dict[str, ModelConfig] = Field(min_length=1)
    plans: dict[str, Plan] = Field(default_factory=lambda: {"default": Plan()})
    default_plan: str = "default"
    retry: RetryConfig = Field(default_factory=RetryConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @model_validator(mode="after")
    def _cross_refs(self) -> GatewayConfig:
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan: unknown plan {self.default_plan!r}")
        seen: dict[str, str] = {name: name for name in self.models}
        for name, m in self.models.items():
            for i, r in enumerate(m.routes):
                if r.provider not in self.providers:
                    raise ValueError(f"models.{name}.routes.{i}.provider: unknown provider {r.provider!r}")
            self._check_endpoints(name, m)
            for alias in m.aliases:
                if alias in seen:
                    raise ValueError(f"models.{name}.aliases: {alias!r} already names {seen[alias]!r}")
                seen[alias] = name
        for plan_name, plan in self.plans.items():
            for model in plan.models or ():
                if model not in seen:
                    raise ValueError(f"plans.{plan_name}.models: unknown model {model!r}")
        return self

    def _check_endpoints(self, name: str, m: ModelConfig) -> None:
        """Every route serves at least one of the model's endpoints, and every endpoint has a route: a route
        no endpoint can use is a config error naming it, never a request that fails at run time."""
        for e in m.endpoints or ():
            if ENDPOINT_KIND[e] != m.kind:
                raise ValueError(f"models.{name}.endpoints: {e} does not serve {m.kind} models")
        wanted = set(m.endpoints) if m.endpoints is not None else set(ENDPOINT_KIND)
        covered: set[str] = set()
        for i, r in enumerate(m.routes):
            api = self.providers[r.provider].api
            serves = set(endpoints_of(api, m.kind)) & wanted
            if not serves:
                want = ", ".join(sorted(e for e in wanted if ENDPOINT_KIND[e] == m.kind))
                raise ValueError(f"models.{name}.routes.{i}: provider {r.provider!r} speaks the {api} API, "
                                 f"which serves none of this model's endpoints ({want})")  # fmt: skip
            covered |= serves
        for e in m.endpoints or ():
            if e not in covered:
                raise ValueError(f"models.{name}.endpoints: no route's provider speaks an API that serves {e}")

    def model_endpoints(self, name: str) -> tuple[str, ...]:
        """The endpoints that serve a model: declared, or every endpoint one of its routes serves natively."""
        m = self.models[name]
        served = {e for r in m.routes for e in endpoints_of(self.providers[r.provider].api, m.kind)}
        wanted = set(m.endpoints) if m.endpoints is not None else served
        return tuple(e for e in ENDPOINT_KIND if e in wanted and e in served)

    def route_serves(self, route: Route, endpoint: str) -> bool:
        return self.providers[route.provider].api in SERVED_BY[endpoint]

    def resolve(self, requested: str) -> str | None:
        """Public model name for a requested name or alias; None when unknown."""
        if requested in self.models:
            return requested
        for name, m in self.models.items():
            if requested in m.aliases:
                return name
        return None


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def parse_config(data: object, source: str = "<inline>") -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (set TOLLWAY_CONFIG)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {e}") from None
    return parse_config(data, str(p))
