"""Public model names and aliases -> ordered upstream targets, resolved once from the config."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.config import GatewayConfig, RetryConfig
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


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    kind: str
    targets: tuple[Target, ...]
    cache_ttl_s: float | None = None
    retry: RetryConfig | None = None
    max_output_tokens: int | None = None


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}
        for name, m in config.models.items():
            targets = []
            for i, r in enumerate(m.routes):
                p = config.providers[r.provider]
                headers = {"content-type": "application/json", **p.headers}
                key = p.api_key()  # read once at start: no env lookups on the request path
                if key:
                    headers["authorization"] = f"Bearer {key}"
                targets.append(Target(r.provider, p.base_url, r.model or name, headers, p.timeout_s,
                                      p.connect_timeout_s, r.weight, r.priority, i))  # fmt: skip
            route = ModelRoute(name, m.kind, tuple(targets), m.cache_ttl_s, m.retry, m.max_output_tokens)
            self._routes[name] = route
            self._aliases[name] = tuple(m.aliases)
            for alias in m.aliases:
                self._routes[alias] = route
        self.public_names = sorted(config.models)
        self.routes = {name: self._routes[name] for name in self.public_names}

    def resolve(self, requested: object, endpoint_kind: str, allowed: frozenset[str] | None = None) -> ModelRoute:
        """`allowed` (from the key's plan) holds public names and aliases; a model outside it is reported
        exactly like an unknown one, as OpenAI does."""
        if not isinstance(requested, str) or not requested:
            raise ModelNotFound("You must provide a model parameter.", code="model_not_found")
        route = self._routes.get(requested)
        if route is not None and allowed is not None and requested not in allowed and route.name not in allowed:
            route = None
        if route is None:
            raise ModelNotFound(f"The model '{requested[:200]}' does not exist or you do not have access to it.")
        if route.kind != endpoint_kind:
            raise ModelNotFound(f"The model '{requested[:200]}' is not a {endpoint_kind} model.")
        return route

    def names_for(self, allowed: frozenset[str] | None) -> list[str]:
        if allowed is None:
            return self.public_names
        return [n for n in self.public_names if n in allowed or any(a in allowed for a in self._aliases[n])]
