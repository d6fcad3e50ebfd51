"""Route health: a breaker, a latency EWMA and a Retry-After cool-down per route, the try order they give,
and optional active probes per provider. Visible in /readyz and as metrics."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import structlog

from schemas.config import GatewayConfig, HealthConfig
from schemas.prices import PriceBook
from services.proxy import balancer, metrics
from services.proxy.breaker import STATE_VALUE, CircuitBreaker
from services.proxy.route_prices import RoutePrices
from services.proxy.routing import ModelRoute, Router, Target

log = structlog.get_logger("tollway.proxy.health")


class RouteState:
    __slots__ = ("breaker", "cool_until", "ewma_s", "gauge", "model", "shown", "target")

    def __init__(self, model: str, target: Target, cfg: HealthConfig) -> None:
        self.model = model
        self.target = target
        self.breaker = CircuitBreaker(cfg.failure_threshold, cfg.cooldown_s)
        self.ewma_s: float | None = None
        self.cool_until = 0.0  # an upstream Retry-After: no traffic before this (monotonic clock)
        # the child gauge is looked up once: labels() on every request costs a dict build and a lock
        self.gauge = metrics.BREAKER_STATE.labels(model, target.provider, str(target.index))
        self.gauge.set(0)
        self.shown = 0  # the gauge's value: set again only when the state changes (a locked write per call)

    def available_for_retry(self) -> bool:
        return self.breaker.state != "open"

    def available(self, now: float) -> bool:
        return now >= self.cool_until and self.breaker.would_allow(now)

    def describe(self, now: float) -> dict[str, Any]:
        return {"model": self.model, "route": self.target.index, "provider": self.target.provider,
                "upstream_model": self.target.upstream_model, "state": self.breaker.state,
                "consecutive_failures": self.breaker.failures,
                "ewma_ms": round(self.ewma_s * 1000, 3) if self.ewma_s is not None else None,
                "cooling_s": round(max(0.0, self.cool_until - now), 3)}  # fmt: skip


class Health:
    def __init__(self, router: Router, config: GatewayConfig, rng: random.Random | None = None,
                 book: PriceBook | None = None) -> None:  # fmt: skip
        self.cfg = config.health
        self.rng = rng or random.Random()
        self.prices = RoutePrices(book or PriceBook(config), router.targets)  # for `cheapest`
        self.by_model: dict[str, tuple[RouteState, ...]] = {
            name: tuple(RouteState(name, t, self.cfg) for t in targets) for name, targets in router.targets.items()
        }
        # per endpoint, the same RouteState objects: a breaker opened by chat calls also spares /v1/responses
        self.by_route: dict[tuple[str, str], tuple[RouteState, ...]] = {
            key: tuple(self.by_model[route.name][t.index] for t in route.targets)
            for key, route in router.routes.items()
        }
        self.probes = {name: p for name, p in config.providers.items() if p.health_check_interval_s}
        self.probe_results: dict[str, dict[str, Any]] = {}

    def plan(self, route: ModelRoute, now: float | None = None,
             mix: tuple[int, int] | None = None) -> list[RouteState]:  # fmt: skip
        """Routes to try, in order (the model's routing strategy); routes with an open breaker or cooling down
        are left out. `mix` (prompt, output tokens expected) is what `cheapest` ranks by."""
        now = time.monotonic() if now is None else now
        states = self.by_route[(route.name, route.endpoint)]
        if len(states) == 1:
            return [states[0]] if states[0].available(now) else []
        if route.routing == "cheapest":
            costs = self.prices.expected(route.name, mix or (1, route.typical_output_tokens))
            cands = [balancer.Candidate(i, s.target.priority, s.target.weight, s.ewma_s, costs[s.target.index])
                     for i, s in enumerate(states) if s.available(now)]  # fmt: skip
            return [states[i] for i in balancer.cheapest(cands, self.rng)]
        cands = [balancer.Candidate(i, s.target.priority, s.target.weight, s.ewma_s)
                 for i, s in enumerate(states) if s.available(now)]  # fmt: skip
        if route.routing == "fastest":
            return [states[i] for i in balancer.fastest(cands, self.rng)]
        return [states[i] for i in balancer.order(cands, self.cfg.latency_bias, self.rng)]

    def retry_in(self, route: ModelRoute, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return min(
            max(s.breaker.retry_in(now), s.cool_until - now, 0.0) for s in self.by_route[(route.name, route.endpoint)]
        )

    def begin(self, s: RouteState) -> bool:
        """Claim the route for one call; False when a half-open breaker's single probe slot is taken."""
        now = time.monotonic()
        if not s.breaker.allows(now):
            return False
        s.breaker.begin(now)
        self._show(s)
        return True

    def success(self, s: RouteState, latency_s: float) -> None:
        s.breaker.success()
        s.ewma_s = balancer.ewma(s.ewma_s, latency_s, self.cfg.ewma_alpha)
        self._show(s)

    def failure(self, s: RouteState) -> None:
        before = s.breaker.state
        s.breaker.failure(time.monotonic())
        if s.breaker.state != before:
            log.warning("route_breaker", model=s.model, provider=s.target.provider, route=s.target.index,
                        state=s.breaker.state, failures=s.breaker.failures)  # fmt: skip
        self._show(s)

    def throttled(self, s: RouteState, seconds: float) -> None:
        """The provider said 429 / Retry-After: it is alive, just not for us right now."""
        s.cool_until = max(s.cool_until, time.monotonic() + seconds)
        s.breaker.release()

    def release(self, s: RouteState) -> None:
        s.breaker.release()

    def _show(self, s: RouteState) -> None:
        value = STATE_VALUE[s.breaker.state]
        if value != s.shown:
            s.shown = value
            s.gauge.set(value)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [s.describe(now) for states in self.by_model.values() for s in states]

    def unhealthy_models(self) -> list[str]:
        now = time.monotonic()
        return [m for m, states in self.by_model.items() if not any(s.available(now) for s in states)]

    async def probe_loop(self, http: httpx.AsyncClient, router: Router, stop: asyncio.Event) -> None:
        """Active health: GET each probed provider's health path on its interval; a failure opens its routes'
        breakers before a user request has to find out, a success lets an open route take a probe request."""
        if not self.probes:
            return
        due = dict.fromkeys(self.probes, 0.0)
        headers = {}
        for states in self.by_model.values():
            for s in states:
                headers.setdefault(
                    s.target.provider, {k: v for k, v in s.target.headers.items() if k != "content-type"}
                )
        while not stop.is_set():
            now = time.monotonic()
            for name, provider in self.probes.items():
                if now >= due[name]:
                    due[name] = now + (provider.health_check_interval_s or 60)
                    await self._probe(http, name, provider.base_url + provider.health_check_path,
                                      headers.get(name, {}), provider.connect_timeout_s)  # fmt: skip
            wait = max(0.05, min(due.values()) - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _probe(self, http: httpx.AsyncClient, provider: str, url: str, headers: dict[str, str],
                     timeout_s: float) -> None:  # fmt: skip
        t0 = time.monotonic()
        try:
            r = await http.get(url, headers=headers, timeout=httpx.Timeout(max(timeout_s, 1.0) * 2))
            ok = r.status_code < 300
            detail = f"HTTP {r.status_code}"
        except httpx.HTTPError as err:
            ok, detail = False, type(err).__name__
        metrics.PROBES.labels(provider, "ok" if ok else "fail").inc()
        self.probe_results[provider] = {"ok": ok, "detail": detail, "ms": round((time.monotonic() - t0) * 1000, 1)}
        now = time.monotonic()
        for states in self.by_model.values():
            for s in states:
                if s.target.provider != provider:
                    continue
                if ok:
                    s.breaker.half_open()
                elif s.breaker.state != "open":
                    s.breaker.trip(now)
                    log.warning("route_probe_failed", provider=provider, model=s.model, detail=detail)
                self._show(s)
