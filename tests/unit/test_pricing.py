"""Pricing is Decimal-exact, versioned by effective date, and never silently zero."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from schemas.config import parse_config
from schemas.prices import PriceBook, cost_of, price
from tests.support.events import make_event

CONFIG = parse_config({
    "providers": {"p": {"base_url": "http://x"}, "q": {"base_url": "http://y"}},
    "models": {
        "m": {
            "routes": [{"provider": "p"}, {"provider": "q", "prices": [{"input": "9", "output": "9"}]}],
            "prices": [
                {"effective_from": "2026-01-01", "input": "2.00", "output": "8.00", "cached_input": "0.50"},
                {"effective_from": "2026-06-01", "input": "1.10", "output": "4.40"},
            ],
        },
        "free-model": {"routes": [{"provider": "p"}]},
    },
})  # fmt: skip
BOOK = PriceBook(CONFIG)


def at(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def test_price_in_force_at_occurred_at_is_used():
    assert BOOK.at("m", "p", at("2026-03-15")).input == Decimal("2.00")
    assert BOOK.at("m", "p", at("2026-06-01")).input == Decimal("1.10")
    assert BOOK.at("m", "p", at("2026-05-31T23:59:59")).version.startswith("m/*@2026-01-01#")
    assert BOOK.at("m", "p", at("2025-12-31")) is None  # before any price: unpriced, not free


def book_with(**price: str) -> PriceBook:
    return PriceBook(parse_config({"providers": {"p": {"base_url": "http://x"}},
                                   "models": {"m": {"routes": [{"provider": "p"}],
                                                    "prices": [{"effective_from": "2026-01-01", **price}]}}}))  # fmt: skip


def version(**price: str) -> str:
    return book_with(**price).at("m", "p", at("2026-03-15")).version


def test_two_unit_prices_under_one_date_never_share_a_version():
    # An in-place edit of the yaml: same model, provider and effective_from, other unit prices.
    base = version(input="2.00", output="8.00", cached_input="0.50")
    assert base.startswith("m/*@2026-01-01#")
    edits = [version(input="2.01", output="8.00", cached_input="0.50"),
             version(input="2.00", output="8.01", cached_input="0.50"),
             version(input="2.00", output="8.00", cached_input="0.51"),
             version(input="2.00", output="8.00")]  # fmt: skip  # cached_input then defaults to input
    assert len({base, *edits}) == 5


def test_a_version_names_the_price_not_how_it_was_written():
    assert version(input="2", output="8", cached_input="0.5") == version(input="2.00", output="8.0",
                                                                        cached_input="0.50")  # fmt: skip
    assert version(input="2", output="8") == version(input="2", output="8", cached_input="2")


def test_route_price_overrides_model_price():
    assert BOOK.at("m", "q", at("2026-03-15")).input == Decimal("9")


def test_cached_input_defaults_to_input_price():
    assert BOOK.at("m", "p", at("2026-07-01")).cached_input == Decimal("1.10")


def test_cost_is_exact_decimal_and_cached_tokens_billed_once_at_cached_rate():
    unit = BOOK.at("m", "p", at("2026-03-15"))
    c = cost_of(prompt_tokens=1_000_000, completion_tokens=333_333, cached_tokens=400_000, unit=unit)
    assert c.input == Decimal("1.2")  # 600k uncached x $2/M
    assert c.cached_input == Decimal("0.2")  # 400k x $0.50/M
    assert c.output == Decimal("2.666664")  # 333,333 x $8/M, no float rounding
    assert c.total == Decimal("4.066664")
    assert all(isinstance(v, Decimal) for v in (c.input, c.cached_input, c.output, c.total))


def test_one_token_at_tiny_price_is_not_rounded_away():
    unit = BOOK.at("m", "p", at("2026-03-15"))
    assert cost_of(1, 0, 0, unit).total == Decimal("0.000002")


def test_event_without_price_is_unpriced_not_zero():
    e = make_event("t", served_model="free-model", provider="p", occurred_at=at("2026-03-15"))
    assert price(e, BOOK).unit is None


def test_tokenless_rejection_needs_no_price():
    e = make_event("t", served_model="free-model", provider="p", status="rejected", prompt_tokens=0,
                   completion_tokens=0)  # fmt: skip
    p = price(e, BOOK)
    assert p.unit is not None and p.cost.total == 0


def test_cache_hit_costs_nothing_but_keeps_price_version():
    e = make_event("t", served_model="m", provider="p", status="cached", cache_hit=True, occurred_at=at("2026-03-15"))
    p = price(e, BOOK)
    assert p.cost.total == 0 and p.unit.version == BOOK.at("m", "p", at("2026-03-15")).version


def test_served_model_is_priced_not_requested_alias():
    e = make_event("t", requested_model="alias", served_model="m", provider="p", occurred_at=at("2026-03-15"),
                   prompt_tokens=500_000, completion_tokens=0)  # fmt: skip
    assert price(e, BOOK).cost.total == Decimal("1")
