"""The cost the proxy tells the caller: exact decimal text (never a float, never an exponent), the price
version, a status saying what the amount is, and the same amount the meter's pricing gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from schemas.config import parse_config
from schemas.events import UsageEvent
from schemas.prices import PriceBook, price
from services.proxy.cost import (
    COST_HEADER,
    STATUS_HEADER,
    VERSION_HEADER,
    QuoteBook,
    quote,
    usage_with_cost,
)
from services.proxy.tokens import TokenUsage

WHEN = datetime(2026, 12, 2, 10, 30, tzinfo=UTC)
MILLION = Decimal(1_000_000)


def config(**model: object):
    return parse_config({
        "providers": {"a": {"base_url": "http://a"}, "b": {"base_url": "http://b"}},
        "models": {
            "m": {"routes": [{"provider": "a"}, {"provider": "b", "prices": [{"input": "5", "output": "7"}]}],
                  "prices": [{"effective_from": "2025-01-01", "input": "0.1", "output": "0.2", "cached_input": "0.01"},
                             {"effective_from": "2026-12-03", "input": "0.3", "output": "0.6"}], **model},
            "free": {"routes": [{"provider": "a"}]},
        },
    })  # fmt: skip


@pytest.fixture
def book() -> QuoteBook:
    return QuoteBook(config())


def test_the_amount_is_exact_decimal_text_where_a_float_would_round(book):
    # 1M tokens at 0.1 + 1M at 0.2 per 1M: 0.1 + 0.2, which a float sums to 0.30000000000000004
    assert 0.1 + 0.2 != 0.3
    q = quote(book, "m", "a", WHEN, "ok", TokenUsage(1_000_000, 1_000_000))
    assert q.usd == "0.3" and q.status == "provisional"
    assert q.version.startswith("m/*@2025-01-01#")


def test_tiny_and_large_amounts_have_no_exponent_and_no_trailing_zeros(book):
    tiny = quote(book, "m", "a", WHEN, "ok", TokenUsage(1, 0))
    assert tiny.usd == "0.0000001"  # Decimal's own str() would say 1E-7
    assert str(Decimal("0.1") / MILLION) == "1E-7"
    big = quote(book, "m", "a", WHEN, "ok", TokenUsage(10**13, 10**13))
    assert big.usd == "3000000"  # str() of the exact Decimal would be 3.000000E+6
    assert "E" not in big.usd and "e" not in big.usd


def test_cached_prompt_tokens_are_told_at_the_cached_rate(book):
    q = quote(book, "m", "a", WHEN, "ok", TokenUsage(prompt_tokens=1000, completion_tokens=10, cached_tokens=400))
    want = (600 * Decimal("0.1") + 400 * Decimal("0.01") + 10 * Decimal("0.2")) / MILLION
    assert Decimal(q.usd) == want and q.usd == "0.000066"


def test_a_route_price_overrides_the_models_for_its_provider(book):
    q = quote(book, "m", "b", WHEN, "ok", TokenUsage(1000, 1000))
    assert Decimal(q.usd) == (1000 * Decimal(5) + 1000 * Decimal(7)) / MILLION
    assert q.version.startswith("m/b@")


def test_the_price_in_force_on_the_calls_day_is_used_even_after_the_memo_saw_another_day(book):
    before = quote(book, "m", "a", WHEN, "ok", TokenUsage(1_000_000, 0))
    after = quote(book, "m", "a", datetime(2026, 12, 3, 0, 0, tzinfo=UTC), "ok", TokenUsage(1_000_000, 0))
    again = quote(book, "m", "a", WHEN, "ok", TokenUsage(1_000_000, 0))
    assert (before.usd, after.usd, again.usd) == ("0.1", "0.3", "0.1")
    assert before.version != after.version and again.version == before.version


def test_statuses_say_what_the_amount_is(book):
    usage = TokenUsage(2000, 300)
    provisional = quote(book, "m", "a", WHEN, "ok", usage, "provider")
    estimated = quote(book, "m", "a", WHEN, "ok", usage, "estimated")
    cached = quote(book, "m", "a", WHEN, "cached", usage, "provider")
    unpriced = quote(book, "free", "a", WHEN, "ok", usage, "provider")
    assert provisional.status == "provisional" and estimated.status == "estimated"
    assert estimated.usd == provisional.usd != "0"  # an estimate is billed as estimated: the same amount
    assert (cached.status, cached.usd, cached.version) == ("cached", "0", provisional.version)
    assert (unpriced.status, unpriced.usd, unpriced.version) == ("unpriced", "", "")


def test_headers_carry_the_amount_and_version_or_only_the_status_when_unpriced(book):
    h = quote(book, "m", "a", WHEN, "ok", TokenUsage(10, 10)).headers()
    assert set(h) == {COST_HEADER, VERSION_HEADER, STATUS_HEADER} and h[STATUS_HEADER] == "provisional"
    assert h[COST_HEADER] == "0.000003"
    assert quote(book, "free", "a", WHEN, "ok", TokenUsage(10, 10)).headers() == {STATUS_HEADER: "unpriced"}


@pytest.mark.parametrize("status", ["ok", "error", "cached", "rejected"])
@pytest.mark.parametrize("provider", ["a", "b"])
def test_the_quote_is_the_meters_price_of_the_same_event(book, status, provider):
    usage = TokenUsage(123_457, 9_871, 3_333)
    event = UsageEvent(event_id="0193a0c6-7d2e-7c3a-8b1e-1234567890ab", occurred_at=WHEN, request_id="r",
                       team_id="t", key_id="k", endpoint="chat.completions", requested_model="m", served_model="m",
                       provider=provider, status=status, http_status=200, prompt_tokens=usage.prompt_tokens,
                       completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens)  # fmt: skip
    billed = price(event, PriceBook(config()))
    q = quote(book, "m", provider, WHEN, status, usage)
    assert Decimal(q.usd) == billed.cost.total and q.version == billed.unit.version


def test_the_memo_is_bounded_and_still_right_after_it_is_cleared():
    book = QuoteBook(config())
    for day in range(1, 29):
        for month in range(1, 13):
            for year in range(2000, 2020):
                book.at("m", "a", datetime(year, month, day, tzinfo=UTC))
    assert len(book._memo) <= 4096
    assert book.at("m", "a", WHEN) == PriceBook(config()).at("m", "a", WHEN)


def test_usage_cost_is_a_json_number_with_the_exact_digits():
    chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "cost": 99.5}}  # fmt: skip
    out = usage_with_cost(chunk, chunk["usage"], "0.0000001234567890123")
    parsed = json.loads(out, parse_float=Decimal)
    assert parsed["usage"]["cost"] == Decimal("0.0000001234567890123")  # the upstream's own cost is replaced
    assert {k: v for k, v in parsed.items() if k != "usage"} == {k: v for k, v in chunk.items() if k != "usage"}
    assert {k: v for k, v in parsed["usage"].items() if k != "cost"} == {"prompt_tokens": 7, "completion_tokens": 3,
                                                                          "total_tokens": 10}  # fmt: skip
    assert b'"cost":0.0000001234567890123}' in out  # no exponent, no quotes: OpenRouter's number
    assert orjson.loads(usage_with_cost({}, {}, "0.5")) == {"usage": {"cost": 0.5}}


def test_the_quota_counts_the_amount_told_and_prices_itself_only_when_nothing_was_told():
    from schemas.config import Limits
    from schemas.control import KeyState
    from services.proxy.draft import UsageDraft
    from services.proxy.quota import QuotaGate

    gate = QuotaGate(config())
    key = KeyState(key_id="k", key_hash="h", prefix="p", team_id="t", limits=Limits(budget_usd_per_month=Decimal(9)))

    def settled(event_id: str, quoted: str) -> Decimal:
        gate.admit(event_id, key, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        d = UsageDraft(event_id=event_id, occurred_at=WHEN, request_id="r", endpoint="chat.completions", team_id="t",
                       key_id="k", requested_model="m", served_model="m", provider="b", status="ok",
                       prompt_tokens=1_000_000, completion_tokens=0, quoted_cost_usd=quoted)  # fmt: skip
        gate.settle(d)
        return gate.states[("key", "k")].pending[event_id][2]

    # route b's own price (5 per 1M input) holds on every day, so the gate's own pricing (at its clock) agrees
    told = quote(QuoteBook(config()), "m", "b", WHEN, "ok", TokenUsage(1_000_000, 0))
    assert settled("e1", told.usd) == Decimal(5) == Decimal(told.usd)
    assert settled("e2", "0.123") == Decimal("0.123")  # what was told is what counts (no second pricing)
    assert settled("e3", "") == Decimal(5)  # nothing told (a stream without include_usage): priced here
