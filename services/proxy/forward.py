"""Forward one request upstream: try routes in the balancer's order, retry with backoff, fall back, all
within the request's attempt cap and deadline. Stops at the first answer the client may see."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.config import RetryConfig
from services.proxy import metrics
from services.proxy.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from services.proxy.health import Health, RouteState
from services.proxy.retry import backoff_s
from services.proxy.routing import ModelRoute, Target

T = TypeVar("T")


@dataclass(slots=True)
class Tried:
    """What forward() did, for the usage event: upstream attempts made, the provider of the latest one (the
    one that answered, on success) and whether it was a fallback route. Kept up to date attempt by attempt,
    so a call that fails or is cancelled midway still records what it tried."""

    attempts: int = 0
    provider: str = ""
    fallback_used: bool = False
    reason: str = ""  # why the latest attempt's route: the strategy, "only_route" or "fallback" (route_reason)


@dataclass(slots=True)
class Forwarded(Generic[T]):
    value: T
    route: RouteState
    upstream_s: float
    tried: Tried


Attempt = Callable[[Target, float], Awaitable[T]]


async def forward(health: Health, route: ModelRoute, policy: RetryConfig, attempt: Attempt[T], started: float,
                  tried: Tried | None = None, rng: random.Random | None = None,
                  mix: tuple[int, int] | None = None) -> Forwarded[T]:  # fmt: skip
    """`attempt(target, budget_s)` makes one upstream call and returns what the client will get, or raises a
    GatewayError saying whether it is retryable. What was tried is returned in `Forwarded.tried`; pass your
    own `tried` to know it also when forward raises (or is cancelled). `mix`: the request's expected
    (prompt, output) tokens, for a model routed `cheapest` (route_prices.expected_mix)."""
    tried = Tried() if tried is None else tried
    deadline = started + policy.deadline_s
    order = health.plan(route, mix=mix)
    if not order:
        wait = health.retry_in(route)
        raise UpstreamUnavailable(
            f"Every route for model '{route.name}' is unavailable (circuit open or cooling down).",
            headers={"retry-after": str(max(1, math.ceil(wait)))}, code="upstream_unavailable",
        )  # fmt: skip
    first = order[0]
    # the strategy chose the first route only if another of its tier was available to choose from
    chosen = route.routing if len(order) > 1 and order[1].target.priority == first.target.priority else "only_route"
    last: GatewayError | None = None
    for pos, s in enumerate(order):
        more_routes = pos + 1 < len(order)
        tries = 0
        while tried.attempts < policy.max_attempts:
            budget = deadline - time.perf_counter()
            if budget <= 0:
                break
            if not health.begin(s):
                break  # half-open and its one probe is already out: leave it to that probe
            tries += 1
            tried.attempts += 1
            tried.provider, tried.fallback_used = s.target.provider, s is not first
            tried.reason = chosen if s is first else "fallback"
            t0 = time.perf_counter()
            try:
                value = await attempt(s.target, budget)
            except GatewayError as err:
                last = err
                if not err.retryable:
                    health.release(s)  # the provider answered: it is up, the request is the problem
                    metrics.attempts_by(route.name, s.target.provider, "rejected").inc()
                    raise
                metrics.attempts_by(route.name, s.target.provider, "failed").inc()
                if err.upstream_status == 429:
                    health.throttled(s, err.retry_after_s if err.retry_after_s is not None else policy.backoff_max_s)
                else:
                    health.failure(s)
                wait = err.retry_after_s
                if tries > policy.retries_per_route or not s.available_for_retry():
                    break
                if wait is not None and (
                    wait > policy.retry_after_max_s or (more_routes and wait > policy.backoff_max_s)
                ):
                    break  # the provider asked for a long pause: another route now beats waiting
                delay = max(backoff_s(tries - 1, policy.backoff_base_s, policy.backoff_max_s, rng), wait or 0.0)
                if time.perf_counter() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
                continue
            except BaseException:
                health.release(s)  # cancelled (client left) or a bug: no verdict on the route
                raise
            up_s = time.perf_counter() - t0
            health.success(s, up_s)
            metrics.attempts_by(route.name, s.target.provider, "ok").inc()
            if s is not first:
                metrics.FALLBACKS.labels(route.name).inc()
            return Forwarded(value, s, up_s, tried)
        if tried.attempts >= policy.max_attempts:
            break
    if last is None:
        last = UpstreamTimeout(f"No upstream answered model '{route.name}' within the request deadline.")
    raise last
