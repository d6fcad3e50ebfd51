"""Prices for every dimension (schemas/prices.py): the version hash of an entry that sets none of the new
dimensions is what it always was, every new unit price moves it; and the one pricing function prices each
dimension of a call from its counts, recomputed here by hand."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from schemas.config import ConfigError, Price, load_config, parse_config
from schemas.prices import LONG_CONTEXT, PriceBook, price_identity, price_set, price_usage, quantities
from services.proxy.tokens import TokenUsage

M = Decimal(1_000_000)
WHEN = datetime(2026, 12, 2, 12, tzinfo=UTC)


def old_version(model: str, provider: str, p: Price) -> str:
    """The version as schemas/prices.py computed it before the new dimensions existed (main @ 9e52a3e)."""
    cached = p.input if p.cached_input is None else p.cached_input
    text = "|".join(format(x.normalize(), "f") for x in (p.input, p.output, cached))
    return f"{model}/{provider}@{p.effective_from.isoformat()}#{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def test_every_existing_entry_keeps_its_version():
    # every entry of the shipped book and of the month-in-the-life e2e book that sets only the old three
    for path in ("tollway.yaml", "tests/e2e/month_in_the_life.yaml"):
        cfg = load_config(path)
        checked = 0
        for name, m in cfg.models.items():
            for p in m.prices:
                if p.model_fields_set <= {"effective_from", "input", "output", "cached_input"}:
                    assert price_set(name, "*", p).version == old_version(name, "*", p), (path, name)
                    checked += 1
        assert checked >= (5 if path == "tollway.yaml" else 1), path
    # and a new field set to what it defaults to prices the same, so it is the same version
    p = Price(effective_from=date(2026, 1, 1), input="2", output="8")
    same = Price(effective_from=date(2026, 1, 1), input="2.00", output="8", cache_write="2", cache_write_1h="2.0",
                 request="0", web_search="0")  # fmt: skip
    assert price_set("m", "*", same).version == price_set("m", "*", p).version == old_version("m", "*", p)


BASE = dict(effective_from=date(2026, 1, 1), input="3", output="15", cached_input="0.3")


@pytest.mark.parametrize(
    "extra",
    [
        {"cache_write": "3.75"},
        {"cache_write_1h": "6"},
        {"request": "0.001"},
        {"web_search": "10"},
        {"long_context": {"above_prompt_tokens": 200_000, "input": "6"}},
        {"long_context": {"above_prompt_tokens": 100_000, "input": "6"}},
        {"long_context": {"above_prompt_tokens": 200_000, "input": "6", "cache_write_1h": "12"}},
        {"service_tiers": {"priority": {"input": "5"}}},
        {"service_tiers": {"flex": {"input": "5"}}},
        {"service_tiers": {"priority": {"input": "5", "cached_input": "0.5"}}},
    ],
)
def test_each_new_unit_price_moves_the_version(extra):
    base = price_set("m", "*", Price(**BASE)).version
    got = price_set("m", "*", Price(**BASE, **extra)).version
    assert got != base
    assert got.startswith("m/*@2026-01-01#")


def test_two_different_tier_prices_never_share_a_version():
    versions = {price_set("m", "*", Price(**BASE, service_tiers={"priority": {"input": x}})).version
                for x in ("5", "5.5", "6")}  # fmt: skip
    versions |= {price_set("m", "*", Price(**BASE, long_context={"above_prompt_tokens": n, "input": "6"})).version
                 for n in (1, 2, 200_000)}  # fmt: skip
    assert len(versions) == 6
    assert price_identity(Price(**BASE, web_search="10")) == price_identity(Price(**BASE, web_search="10.000"))


@dataclass
class Call:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_search_requests: int = 0


BOOK = PriceBook(
    parse_config({
        "providers": {"a": {"base_url": "http://a"}},
        "models": {"m": {"routes": [{"provider": "a"}], "prices": [
            {"effective_from": "2020-01-01", "input": "1", "output": "2"},
            {**{k: str(v) for k, v in BASE.items()}, "cache_write": "3.75", "cache_write_1h": "6", "request": "0.002",
             "web_search": "10",
             "long_context": {"above_prompt_tokens": 200_000, "input": "6", "output": "22.5", "cached_input": "0.6",
                              "cache_write": "7.5"},
             "service_tiers": {"priority": {"input": "5", "output": "20"}, "flex": {"input": "1.5", "output": "7.5",
                                                                                    "cache_write": "2"}}},
        ]}},
    })
)  # fmt: skip


def test_every_dimension_is_priced_from_the_counts():
    call = Call(prompt_tokens=10_000, completion_tokens=700, cached_tokens=4_000, cache_write_tokens=2_000,
                cache_write_1h_tokens=1_000, web_search_requests=3)  # fmt: skip
    p = price_usage(BOOK, "m", "a", WHEN, "ok", call)
    c = p.cost
    assert p.unit.tier == "" and p.unit.version.startswith("m/*@2026-01-01#")
    assert c.input == 3_000 * Decimal(3) / M  # 10000 - 4000 read - 2000 written 5m - 1000 written 1h
    assert c.cached_input == 4_000 * Decimal("0.3") / M
    assert c.cache_write == 2_000 * Decimal("3.75") / M
    assert c.cache_write_1h == 1_000 * Decimal(6) / M
    assert c.output == 700 * Decimal(15) / M
    assert c.request == Decimal("0.002")
    assert c.web_search == 3 * Decimal(10) / 1000
    assert c.total == Decimal("0.009000") + Decimal("0.0012") + Decimal("0.0075") + Decimal("0.006") + Decimal(
        "0.0105") + Decimal("0.002") + Decimal("0.03")  # fmt: skip
    assert all(type(getattr(c, d)) is Decimal for d in ("input", "cached_input", "cache_write", "request"))


def test_long_context_prices_the_whole_call_above_the_threshold():
    at = Call(prompt_tokens=200_000, completion_tokens=10)
    above = Call(prompt_tokens=200_001, completion_tokens=10, cached_tokens=1, cache_write_tokens=100,
                 cache_write_1h_tokens=100)  # fmt: skip
    assert price_usage(BOOK, "m", "a", WHEN, "ok", at).cost.input == 200_000 * Decimal(3) / M
    p = price_usage(BOOK, "m", "a", WHEN, "ok", above)
    assert p.unit.tier == LONG_CONTEXT
    assert (p.cost.input, p.cost.cached_input, p.cost.cache_write, p.cost.cache_write_1h, p.cost.output) == (
        199_800 * Decimal(6) / M, Decimal("0.6") / M, 100 * Decimal("7.5") / M,
        100 * Decimal(6) / M,  # the tier does not name cache_write_1h: its own input, 6
        10 * Decimal("22.5") / M)  # fmt: skip
    assert (p.cost.request, p.cost.web_search) == (Decimal("0.002"), 0)  # fees are the same in every tier


def test_a_service_tier_picks_its_rates_and_an_unknown_or_empty_one_the_base():
    call = Call(prompt_tokens=200_000, completion_tokens=10, cache_write_tokens=1_000)  # at the threshold: short
    flex = price_usage(BOOK, "m", "a", WHEN, "ok", call, "flex")
    assert flex.unit.tier == "flex"
    assert flex.cost.input == 199_000 * Decimal("1.5") / M and flex.cost.cache_write == 1_000 * Decimal(2) / M
    prio = price_usage(BOOK, "m", "a", WHEN, "ok", Call(prompt_tokens=100, cache_write_tokens=10), "priority")
    assert prio.cost.cache_write == 10 * Decimal(5) / M  # unset in the tier: the tier's input
    for tier in ("", "default", "no-such-tier"):
        base = price_usage(BOOK, "m", "a", WHEN, "ok", Call(prompt_tokens=100), tier)
        assert base.unit.tier == "" and base.cost.input == 100 * Decimal(3) / M


def test_inconsistent_counts_are_clipped_to_the_prompt_and_fees_need_a_served_call():
    # more cache reads and writes reported than prompt tokens: reads first, then 5-minute, then 1-hour writes
    q = quantities(100, 5, cached_tokens=60, cache_write_tokens=30, cache_write_1h_tokens=30)
    assert (q.input, q.cached_input, q.cache_write, q.cache_write_1h) == (0, 60, 30, 10)
    assert quantities(10, 0, cached_tokens=50).cached_input == 10
    p = price_usage(BOOK, "m", "a", WHEN, "ok", Call(prompt_tokens=10, cached_tokens=8, cache_write_tokens=8))
    assert (p.cost.input, p.cost.cached_input, p.cost.cache_write) == (
        0,
        8 * Decimal("0.3") / M,
        2 * Decimal("3.75") / M,
    )
    # no tokens (failed before the provider): no request fee; cached and rejected calls cost nothing at all
    assert price_usage(BOOK, "m", "a", WHEN, "error", Call()).cost.total == 0
    assert price_usage(BOOK, "m", "a", WHEN, "error", Call(prompt_tokens=1)).cost.request == Decimal("0.002")
    hit = price_usage(BOOK, "m", "a", WHEN, "cached", Call(prompt_tokens=300_000, web_search_requests=2))
    assert hit.cost.total == 0 and hit.unit.tier == LONG_CONTEXT  # priced (its version kept), billed zero


def test_the_proxy_prices_its_token_usage_without_the_meter():
    usage = TokenUsage(prompt_tokens=1_000, completion_tokens=50, cached_tokens=200, cache_write_tokens=300,
                       web_search_requests=1)  # fmt: skip
    p = price_usage(BOOK, "m", "a", WHEN, "ok", usage, "priority")
    # priority names no cache prices: reads and writes at its own input, 5 (never the base's 0.3)
    assert p.cost.total == (500 * Decimal(5) + 200 * Decimal(5) + 300 * Decimal(5) + 50 * Decimal(20)) / M + Decimal(
        "0.002") + Decimal(10) / 1000  # fmt: skip
    assert p.unit.cached_input == Decimal(5) and p.cost.cached_input == 200 * Decimal(5) / M
    old = price_usage(BOOK, "m", "a", datetime(2021, 1, 1, tzinfo=UTC), "ok", usage)
    assert old.cost.total == (1_000 * Decimal(1) + 50 * Decimal(2)) / M  # the old entry: cache writes at input
    assert price_usage(BOOK, "nope", "a", WHEN, "ok", usage).unit is None  # no price: held


def test_a_bad_tier_or_threshold_is_a_config_error():
    for bad in ({"service_tiers": {"": {"input": "1"}}}, {"long_context": {"above_prompt_tokens": 0, "input": "1"}},
                {"web_search": "-1"}, {"long_context": {"input": "1"}}):  # fmt: skip
        with pytest.raises(ConfigError):
            parse_config({"providers": {"a": {"base_url": "http://a"}},
                          "models": {"m": {"routes": [{"provider": "a"}], "prices": [{"input": "1", **bad}]}}})  # fmt: skip


def test_above_the_threshold_a_tier_without_long_context_rates_is_priced_at_the_long_context_rates():
    # tier rates are for short prompts (OpenAI: priority processing "excludes long context"); never the
    # tier's short-context rates for a long prompt, whether they are cheaper (flex) or dearer (priority)
    call = Call(prompt_tokens=300_000, completion_tokens=10, cache_write_tokens=1_000)
    for tier in ("flex", "priority", "", "no-such-tier"):
        p = price_usage(BOOK, "m", "a", WHEN, "ok", call, tier)
        assert p.unit.tier == LONG_CONTEXT, tier
        assert p.cost.input == 299_000 * Decimal(6) / M and p.cost.output == 10 * Decimal("22.5") / M
        assert p.cost.cache_write == 1_000 * Decimal("7.5") / M


TIERED_LC = PriceBook(
    parse_config({
        "providers": {"a": {"base_url": "http://a"}},
        "models": {"m": {"routes": [{"provider": "a"}], "prices": [
            {"effective_from": "2026-01-01", "input": "3", "output": "15", "cached_input": "0.3",
             "long_context": {"above_prompt_tokens": 200_000, "input": "6", "output": "22.5"},
             "service_tiers": {"batch": {"input": "1.5", "output": "7.5",
                                         "long_context": {"input": "3", "output": "11.25"}},
                               "priority": {"input": "5", "output": "20"}}},
        ]}},
    })
)  # fmt: skip


def test_a_tier_with_its_own_long_context_rates_is_priced_at_them_above_the_threshold():
    # Anthropic stacks a batch discount on the long-context rates: the tier says so with its own long_context
    long, short = Call(prompt_tokens=250_000, completion_tokens=100), Call(prompt_tokens=250, completion_tokens=100)
    p = price_usage(TIERED_LC, "m", "a", WHEN, "ok", long, "batch")
    assert p.unit.tier == "batch+long_context"
    assert p.cost.total == (250_000 * Decimal(3) + 100 * Decimal("11.25")) / M
    assert p.unit.version == price_usage(TIERED_LC, "m", "a", WHEN, "ok", short, "batch").unit.version
    assert price_usage(TIERED_LC, "m", "a", WHEN, "ok", short, "batch").cost.total == (
        250 * Decimal("1.5") + 100 * Decimal("7.5")) / M  # fmt: skip
    # the other tier has none: long context; and the quota's worst case covers the dearest set of all
    assert price_usage(TIERED_LC, "m", "a", WHEN, "ok", long, "priority").unit.tier == LONG_CONTEXT
    entry = TIERED_LC.at("m", "a", WHEN)
    assert entry.worst_case_usd(1_000, 1_000) == (1_000 * Decimal(6) + 1_000 * Decimal("22.5")) / M


def test_a_tier_long_context_moves_the_version_and_the_catalog_form_still_loads():
    tier = {"input": "1.5", "output": "7.5"}
    lc = {"above_prompt_tokens": 200_000, "input": "6", "output": "22.5"}
    plain_tier = price_set("m", "*", Price(**BASE, long_context=lc, service_tiers={"batch": tier})).version
    with_lc = price_set("m", "*", Price(**BASE, long_context=lc, service_tiers={
        "batch": {**tier, "long_context": {"input": "3", "output": "11.25"}}})).version  # fmt: skip
    assert plain_tier != with_lc
    from schemas.config import Rates

    # the catalog import builds plain Rates for a tier: still a valid price, priced as before
    built = Price(**BASE, long_context=lc, service_tiers={"batch": Rates(input="1.5", output="7.5")})
    assert price_set("m", "*", built).version == plain_tier


def test_cost_at_is_the_formula_decimal_for_decimal():
    # the fast path (no Decimal work for an unused dimension, per-price zeros) gives the formula's very Decimals,
    # exponent and all, so a stored or summed cost cannot tell them apart
    import random

    from schemas.prices import _formula, cost_at

    rng = random.Random(16)
    for _ in range(3_000):

        def price() -> str:
            return str(Decimal(rng.randint(0, 10 ** rng.randint(1, 7))).scaleb(-rng.randint(0, 8)))

        unit = price_set("m", "*", Price(effective_from=date(2026, 1, 1), input=price(), output=price(),
                                         cached_input=price(), cache_write=price(), cache_write_1h=price(),
                                         request=price(), web_search=price())).base  # fmt: skip
        counts = [rng.choice([0, 0, 1, rng.randint(0, 5_000), rng.randint(0, 2**40)]) for _ in range(6)]
        q = quantities(*counts, requests=rng.choice([0, 1, 1, 2]))
        fast, slow = cost_at(unit, q), _formula(unit, q)
        assert tuple(map(repr, fast)) == tuple(map(repr, slow)), (unit, q)
        assert repr(fast.total) == repr(slow.total)
