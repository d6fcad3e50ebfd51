"""Public model names and aliases -> ordered upstream targets, resolved once from the config."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.config import GatewayConfig
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


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    kind: str
    targets: tuple[Target, ...]


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self._routes: dict[str, ModelRoute] = {}
        for name, m in config.models.items():
            targets = []
            for r in m.routes:
                p = config.providers[r.provider]
                headers = {"content-type": "application/json", **p.headers}
                key = p.api_key()  # read once at start: no env lookups on the request path
                if key:
                    headers["authorization"] = f"Bearer {key}"
                targets.append(Target(r.provider, p.base_url, r.model or name, headers, p.timeout_s,
                                      p.connect_timeout_s, r.weight))  # fmt: skip
            route = ModelRoute(name, m.kind, tuple(targets))
            self._routes[name] = route
            for alias in m.aliases:
                self._routes[alias] = route
        self.public_names = sorted(config.models)

    def resolve(self, requested: object, endpoint_kind: str) -> ModelRoute:
        if not isinstance(requested, str) or not requested:
            raise ModelNotFound("You must provide a model parameter.", code="model_not_found")
        route = self._routes.get(requested)
        if route is None:
            raise ModelNotFound(f"The model '{requested[:200]}' does not exist or you do not have access to it.")
        if route.kind != endpoint_kind:
            raise ModelNotFound(f"The model '{requested[:200]}' is not a {endpoint_kind} model.")
        return route
