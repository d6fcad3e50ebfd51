"""Public model names and aliases -> ordered upstream targets per endpoint, resolved once from the config.

A model's routes are filtered per endpoint to the providers that speak it natively (schemas/config.py
SERVED_BY): /v1/messages reaches only Anthropic-API providers, /v1/responses only OpenAI ones. Fallbacks,
retries, balancing and breakers then work per endpoint exactly as for chat; a route's health is one state
whichever endpoint used it.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.config import ENDPOINT_KIND, GatewayConfig, Provider, RetryConfig
from services.proxy.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    base_url: str
    upstream_model: str
    headers: dict[str, str]
    timeout_s: float
    connect_timeout_s: float
    weight: float
    priority: int = 0
    index: int = 0  # position in the model's route list: names the route in health and metrics
    api: str = "openai"  # the wire API the provider speaks


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    kind: str
    targets: tuple[Target, ...]
    endpoint: str = "chat.completions"
    cache_ttl_s: float | None = None
    retry: RetryConfig | None = None
    max_output_tokens: int | None = None
    routing: str = "weighted"  # schemas/config.py Routing: how a priority tier is ordered
    typical_output_tokens: int = 256  # `cheapest`: the output expected when a request sets no cap


ANTHROPIC_VERSION = "2023-06-01"  # sent to Anthropic-API providers unless the caller sends its own


def provider_headers(p: Provider) -> dict[str, str]:
    """The headers every call to this provider carries: its key in the form its API expects. Read once at
    start: no env lookups on the request path."""
    headers = {"content-type": "application/json", **p.headers}
    key = p.api_key()
    if p.api == "anthropic":
        headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
        if key:
            headers["x-api-key"] = key
    elif key:
        headers["authorization"] = f"Bearer {key}"
    return headers


def may_call(requested: str, name: str, allowed: frozenset[str] | None) -> bool:
    """THE plan allow-list rule (`allowed` holds public names and aliases; None allows all): a model may be
    called by a name or alias that is listed itself, or by any of its names when its own name is listed."""
    return allowed is None or requested in allowed or name in allowed


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._routes: dict[tuple[str, str], ModelRoute] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}
        self._endpoints: dict[str, tuple[str, ...]] = {}
        self.targets: dict[str, tuple[Target, ...]] = {}  # every route of a model (health keeps one state each)
        headers = {name: provider_headers(p) for name, p in config.providers.items()}
        for name, m in config.models.items():
            targets = []
            for i, r in enumerate(m.routes):
                p = config.providers[r.provider]
                targets.append(Target(r.provider, p.base_url, r.model or name, headers[r.provider], p.timeout_s,
                                      p.connect_timeout_s, r.weight, r.priority, i, p.api))  # fmt: skip
            self.targets[name] = tuple(targets)
            self._aliases[name] = tuple(m.aliases)
            self._endpoints[name] = config.model_endpoints(name)
            for endpoint in self._endpoints[name]:
                served = tuple(t for t, r in zip(targets, m.routes, strict=True) if config.route_serves(r, endpoint))
                route = ModelRoute(name, m.kind, served, endpoint, m.cache_ttl_s, m.retry, m.max_output_tokens,
                                   m.routing, m.typical_output_tokens)  # fmt: skip
                for n in (name, *m.aliases):
                    self._routes[(n, endpoint)] = route
        self.public_names = sorted(config.models)
        self.routes = {k: r for k, r in self._routes.items() if k[0] == r.name}  # (model, endpoint) -> route

    def resolve(self, requested: object, endpoint: str, allowed: frozenset[str] | None = None) -> ModelRoute:
        """`allowed` (from the key's plan) holds public names and aliases; a model outside it is reported
        exactly like an unknown one, as OpenAI does. `endpoint` is a key of schemas.config.ENDPOINT_KIND."""
        if not isinstance(requested, str) or not requested:
            raise ModelNotFound("You must provide a model parameter.", code="model_not_found")
        route = self._routes.get((requested, endpoint))
        if route is None:
            name = self._name_of(requested)
            if name is None or not may_call(requested, name, allowed):
                raise ModelNotFound(f"The model '{requested[:200]}' does not exist or you do not have access to it.")
            kind = ENDPOINT_KIND[endpoint]
            served = ", ".join(self._endpoints[name]) or "none"
            raise ModelNotFound(f"The model '{requested[:200]}' is not served on the {endpoint} endpoint "
                                f"(an endpoint for {kind} models); it is served on: {served}.")  # fmt: skip
        if allowed is not None and not may_call(requested, route.name, allowed):  # (no call when all are allowed)
            raise ModelNotFound(f"The model '{requested[:200]}' does not exist or you do not have access to it.")
        return route

    def _name_of(self, requested: str) -> str | None:
        if requested in self._endpoints:
            return requested
        return next((n for n, aliases in self._aliases.items() if requested in aliases), None)

    def endpoints_of(self, name: str) -> tuple[str, ...]:
        return self._endpoints[name]

    def model_of(self, requested: str, allowed: frozenset[str] | None) -> str | None:
        """The model a name or alias names, when the key may call it by that name; else None."""
        name = self._name_of(requested)
        return name if name is not None and may_call(requested, name, allowed) else None

    def callable_ids(self, allowed: frozenset[str] | None) -> list[tuple[str, str]]:
        """(id, model) for every id a key may call, by id: each model by its own name when that is allowed, else
        by the aliases that are (a plan that lists only an alias is shown the alias, the id it can call)."""
        if allowed is None:
            return [(n, n) for n in self.public_names]
        out = []
        for n in self.public_names:
            ids = (n,) if may_call(n, n, allowed) else tuple(a for a in self._aliases[n] if may_call(a, n, allowed))
            out.extend((i, n) for i in ids)
        return sorted(out)
