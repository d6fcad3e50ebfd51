"""Routing strategies per model: `cheapest` orders a tier by the book's price for the request's expected
tokens (route prices override the model's), `fastest` by latency EWMA, `weighted` as before; ties share by
weight; tiers, breakers and fallbacks are unchanged; the reason for the chosen route is recorded."""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.config import ConfigError, RetryConfig, parse_config
from schemas.prices import PriceBook
from services.proxy.balancer import Candidate, cheapest, fastest
from services.proxy.errors import UpstreamUnavailable
from services.proxy.forward import Tried, forward
from services.proxy.health import Health
from services.proxy.route_prices import RoutePrices, expected_mix
from services.proxy.routing import Router

NO_WAIT = RetryConfig(backoff_base_s=0.0, backoff_max_s=0.0)


def config(routes: list[dict[str, Any]], routing: str = "cheapest", **model: Any):
    return parse_config({
        "providers": {p: {"base_url": f"http://{p}"} for p in ("a", "b", "c", "d")},
        "models": {"m": {"routing": routing, "routes": routes, "prices": [{"input": "1", "output": "1"}], **model}},
    })  # fmt: skip


def planner(routes: list[dict[str, Any]], routing: str = "cheapest", seed: int = 1, **model: Any):
    cfg = config(routes, routing, **model)
    router = Router(cfg)
    health = Health(router, cfg, rng=random.Random(seed))
    route = router.resolve("m", "chat.completions")
    return health, route


def first_providers(health, route, mix, n=1):
    return [health.plan(route, now=0.0, mix=mix)[0].target.provider for _ in range(n)]


# a: cheap input, dear output; b: dear input, cheap output (route prices override the model's 1/1)
IN_CHEAP = {"provider": "a", "prices": [{"input": "1", "output": "10"}]}
OUT_CHEAP = {"provider": "b", "prices": [{"input": "5", "output": "2"}]}


def test_cheapest_follows_the_requests_token_mix_with_route_price_overrides():
    health, route = planner([IN_CHEAP, OUT_CHEAP])
    # prompt-heavy: a = 1000*1 + 10*10 = 1100 < b = 1000*5 + 10*2 = 5020
    assert [s.target.provider for s in health.plan(route, now=0.0, mix=(1000, 10))] == ["a", "b"]
    # output-heavy: a = 10 + 10000 > b = 50 + 2000
    assert [s.target.provider for s in health.plan(route, now=0.0, mix=(10, 1000))] == ["b", "a"]


def test_a_route_without_its_own_price_is_priced_at_the_models():
    health, route = planner([{"provider": "a"}, {"provider": "b", "prices": [{"input": "0.5", "output": "0.5"}]},
                             {"provider": "c", "prices": [{"input": "3", "output": "3"}]}])  # fmt: skip
    assert [s.target.provider for s in health.plan(route, now=0.0, mix=(100, 100))] == ["b", "a", "c"]


def test_the_expected_mix_is_the_body_size_and_the_output_cap_times_n():
    _, route = planner([{"provider": "a"}], typical_output_tokens=300)
    assert expected_mix({"max_tokens": 50}, 4000, route) == (1000, 50)
    assert expected_mix({"max_completion_tokens": 70, "max_tokens": 50, "n": 3}, 40, route) == (10, 210)
    assert expected_mix({}, 1, route) == (1, 300)  # no cap: the model's typical output
    assert expected_mix({"max_output_tokens": 90}, 40, route) == (10, 90)  # the Responses API's cap
    assert expected_mix({"max_tokens": True, "n": "2"}, 8, route) == (2, 300)  # junk reads as absent
    cfg = parse_config({"providers": {"a": {"base_url": "http://a"}},
                        "models": {"e": {"kind": "embedding", "routes": [{"provider": "a"}]}}})  # fmt: skip
    assert expected_mix({"input": "x" * 400}, 412, Router(cfg).resolve("e", "embeddings")) == (103, 0)


def test_routes_at_the_same_price_share_load_by_weight():
    same = {"prices": [{"input": "2", "output": "2"}]}
    health, route = planner([{"provider": "a", "weight": 3, **same}, {"provider": "b", "weight": 1, **same},
                             {"provider": "c", "prices": [{"input": "9", "output": "9"}]}])  # fmt: skip
    orders = [tuple(s.target.provider for s in health.plan(route, now=0.0, mix=(100, 100))) for _ in range(2000)]
    firsts = Counter(o[0] for o in orders)
    assert set(firsts) == {"a", "b"} and 2.4 < firsts["a"] / firsts["b"] < 3.8
    assert all(o[2] == "c" for o in orders)  # the dearer route always after both


def test_the_cheaper_fallback_tier_is_never_tried_before_the_primary_tier():
    health, route = planner([{"provider": "a", "prices": [{"input": "9", "output": "9"}]},
                             {"provider": "b", "priority": 1, "prices": [{"input": "0.1", "output": "0.1"}]},
                             {"provider": "c", "prices": [{"input": "5", "output": "5"}]}])  # fmt: skip
    assert [s.target.provider for s in health.plan(route, now=0.0, mix=(100, 100))] == ["c", "a", "b"]


def test_a_route_with_no_price_in_force_goes_last_in_its_tier():
    cfg = parse_config({
        "providers": {"a": {"base_url": "http://a"}, "b": {"base_url": "http://b"}},
        "models": {"m": {"routing": "cheapest", "routes": [
            {"provider": "a"}, {"provider": "b", "prices": [{"input": "50", "output": "50"}]}]}},
    })  # fmt: skip
    router = Router(cfg)
    health = Health(router, cfg)
    route = router.resolve("m", "chat.completions")
    assert [s.target.provider for s in health.plan(route, now=0.0, mix=(100, 100))] == ["b", "a"]


def test_an_open_breaker_takes_the_cheapest_route_out_and_the_next_cheapest_leads():
    health, route = planner([IN_CHEAP, OUT_CHEAP])
    cheap = health.plan(route, now=0.0, mix=(1000, 10))[0]
    for _ in range(health.cfg.failure_threshold):
        health.failure(cheap)
    assert [s.target.provider for s in health.plan(route, mix=(1000, 10))] == ["b"]


def test_fastest_orders_by_ewma_and_explores_unmeasured_routes_first():
    health, route = planner([{"provider": "a"}, {"provider": "b"}, {"provider": "c"}], routing="fastest")
    states = {s.target.provider: s for s in health.by_route[("m", "chat.completions")]}
    states["a"].ewma_s, states["b"].ewma_s = 0.200, 0.050
    assert [s.target.provider for s in health.plan(route, now=0.0)] == ["c", "b", "a"]  # c: never measured
    states["c"].ewma_s = 0.120
    assert [s.target.provider for s in health.plan(route, now=0.0)] == ["b", "c", "a"]


def test_fastest_treats_sub_millisecond_differences_as_ties_shared_by_weight():
    rng = random.Random(3)
    cands = [Candidate(0, 0, 1.0, 0.0002), Candidate(1, 0, 1.0, 0.0009), Candidate(2, 0, 1.0, 0.004)]
    firsts = Counter(fastest(cands, rng)[0] for _ in range(1000))
    assert set(firsts) == {0, 1} and min(firsts.values()) > 400


def test_cheapest_on_bare_candidates_ties_by_weight_and_unpriced_last():
    rng = random.Random(5)
    cands = [Candidate(0, 0, 1.0, None, None), Candidate(1, 0, 1.0, None, 2.0), Candidate(2, 0, 4.0, None, 2.0),
             Candidate(3, 0, 1.0, None, 1.0)]  # fmt: skip
    orders = [cheapest(cands, rng) for _ in range(1000)]
    assert all(o[0] == 3 and o[-1] == 0 for o in orders)
    seconds = Counter(o[1] for o in orders)
    assert 3.0 < seconds[2] / seconds[1] < 5.5


def test_unit_prices_are_looked_up_once_per_price_day():
    cfg = config([{"provider": "a", "prices": [{"effective_from": "2026-01-01", "input": "1", "output": "1"},
                                               {"effective_from": "2026-12-03", "input": "9", "output": "9"}]},
                  {"provider": "b", "prices": [{"input": "4", "output": "4"}]}])  # fmt: skip
    lookups = []

    class CountingBook(PriceBook):
        def at(self, model, provider, when):
            lookups.append((provider, when.date()))
            return super().at(model, provider, when)

    now = [datetime(2026, 12, 2, 23, 59, tzinfo=UTC).timestamp()]
    prices = RoutePrices(CountingBook(cfg), Router(cfg).targets, clock=lambda: now[0])
    assert [prices.expected("m", (1, 1)) for _ in range(100)][-1] == (2.0, 8.0)
    assert len(lookups) == 2  # two routes, one day: the first call looked, the other 99 did not
    now[0] += 120  # past midnight UTC: the new day's price is in force
    assert prices.expected("m", (1, 1)) == (18.0, 8.0) and len(lookups) == 4


@pytest.mark.parametrize(
    ("routes", "routing", "reason"),
    [
        ([IN_CHEAP, OUT_CHEAP], "cheapest", "cheapest"),
        ([{"provider": "a"}, {"provider": "b"}], "fastest", "fastest"),
        ([{"provider": "a"}, {"provider": "b"}], "weighted", "weighted"),
        ([{"provider": "a"}, {"provider": "b", "priority": 1}], "cheapest", "only_route"),
        ([{"provider": "a"}], "weighted", "only_route"),
    ],
)
async def test_the_reason_names_what_chose_the_route(routes, routing, reason):
    health, route = planner(routes, routing)
    tried = Tried()

    async def attempt(target, budget_s):
        return target.provider

    fwd = await forward(health, route, NO_WAIT, attempt, started=time.perf_counter(), tried=tried, mix=(1000, 10))
    assert tried.reason == reason and fwd.tried.fallback_used is False


async def test_a_fallback_after_the_chosen_route_fails_is_recorded_as_fallback():
    health, route = planner([IN_CHEAP, OUT_CHEAP])

    async def attempt(target, budget_s):
        if target.provider == "a":  # the cheapest for this mix
            err = UpstreamUnavailable("down")
            err.retryable = True
            raise err
        return target.provider

    tried = Tried()
    fwd = await forward(health, route, NO_WAIT, attempt, started=time.perf_counter(), tried=tried, mix=(1000, 10))
    assert fwd.value == "b" and tried.reason == "fallback" and tried.fallback_used and tried.attempts == 3


def test_an_unknown_strategy_stops_the_config_naming_the_field():
    with pytest.raises(ConfigError, match=r"models\.m\.routing: Input should be 'weighted', 'cheapest' or 'fastest'"):
        config([{"provider": "a"}], routing="random")
    assert config([{"provider": "a"}], routing="weighted").models["m"].typical_output_tokens == 256
