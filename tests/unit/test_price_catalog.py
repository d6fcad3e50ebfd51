"""The import plan over plain catalog data: only new dated entries, never a rewrite, never a past date beside
a price in force; the check says missing / stale / unchecked / ok."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from schemas.config import parse_config
from schemas.price_catalog import CatalogModel, CatalogPrice, Lookup, check, plan

TODAY = date(2026, 12, 2)


def lookup(models: dict[tuple[str, str], CatalogModel]) -> Lookup:
    by_name = {m.name: m for m in models.values()}
    return Lookup("test catalog", lambda name, provider, url: models.get((name, provider)), by_name.get)


def config(prices: list[dict], routes: list[dict] | None = None):
    return parse_config({"providers": {"p": {"base_url": "http://x"}, "q": {"base_url": "http://y"}},
                         "models": {"m": {"aliases": ["m-alias"], "routes": routes or [{"provider": "p", "model": "up-m"}],
                                          "prices": prices}}})  # fmt: skip


CAT = CatalogModel("p/up-m", (CatalogPrice(None, Decimal("1.5"), Decimal("6"), Decimal("0.15")),))


def test_a_future_entry_of_the_book_with_another_price_on_the_same_date_is_a_conflict_not_a_rewrite():
    cfg = config([{"effective_from": "2025-01-01", "input": "2", "output": "8"},
                  {"effective_from": "2026-12-20", "input": "9", "output": "9"}])  # fmt: skip
    [p] = plan(cfg, lookup({("up-m", "p"): CAT}), TODAY, date(2026, 12, 20))
    assert p.add == [] and "already has a different price dated 2026-12-20" in p.problem
    [p] = plan(cfg, lookup({("up-m", "p"): CAT}), TODAY, date(2026, 12, 10))
    assert p.problem is None and [(e.effective_from, e.input) for e in p.add] == [(date(2026, 12, 10), Decimal("1.5"))]


def test_the_primary_routes_upstream_name_is_tried_before_the_public_name_and_aliases():
    routes = [{"provider": "q", "model": "fallback-m", "priority": 1}, {"provider": "p", "model": "up-m"}]
    cfg = config([], routes)
    other = CatalogModel("alias-price", (CatalogPrice(None, Decimal(7)),))
    [p] = plan(cfg, lookup({("up-m", "p"): CAT, ("m-alias", "p"): other}), TODAY)
    assert p.catalog == "p/up-m"
    [p] = plan(cfg, lookup({("m-alias", "p"): other}), TODAY)
    assert p.catalog == "alias-price"  # the alias on the primary route's provider


def test_a_catalog_price_without_cached_input_equals_a_book_price_without_one():
    cfg = config([{"effective_from": "2025-01-01", "input": "1.50", "output": "6.0", "cached_input": "1.5"}])
    no_cache = CatalogModel("p/up-m", (CatalogPrice(None, Decimal("1.5"), Decimal("6")),))
    [p] = plan(cfg, lookup({("up-m", "p"): no_cache}), TODAY)
    assert (p.add, p.note) == ([], "up to date")


def test_check_missing_when_only_a_future_price_exists_and_unchecked_when_the_catalog_refuses():
    cfg = config([{"effective_from": "2027-01-01", "input": "1.5", "output": "6", "cached_input": "0.15"}])
    [f] = check(cfg, lookup({("up-m", "p"): CAT}), TODAY)
    assert (f.status, f.detail) == ("missing", "no price in force on 2026-12-02")
    cfg = config([{"effective_from": "2025-01-01", "input": "1", "output": "1"}])
    refused = CatalogModel("p/up-m", (), refused="time-of-day prices")
    [f] = check(cfg, lookup({("up-m", "p"): refused}), TODAY)
    assert f.status == "unchecked" and f.detail.startswith("time-of-day prices")
    [f] = check(cfg, lookup({("up-m", "p"): CAT}), TODAY)
    assert f.status == "stale" and "input 1.5 output 6 cached_input 0.15" in f.detail


def test_route_prices_are_named_as_kept_by_hand():
    cfg = config([{"effective_from": "2025-01-01", "input": "1.5", "output": "6", "cached_input": "0.15"}],
                 [{"provider": "p", "model": "up-m", "prices": [{"effective_from": "2025-01-01", "input": "3"}]}])  # fmt: skip
    [f] = check(cfg, lookup({("up-m", "p"): CAT}), TODAY)
    assert f.status == "ok" and "route prices (p) are not checked" in f.detail


def test_a_catalog_price_in_force_since_a_past_day_is_added_from_today_beside_a_price_in_force():
    # genai-prices dates a price from the day its service tier began: the book, priced today, catches up today
    since = CatalogModel("p/up-m", (CatalogPrice(date(2026, 10, 12), Decimal("1.5"), Decimal("6")),))
    cfg = config([{"effective_from": "2025-01-01", "input": "2", "output": "8"}])
    [p] = plan(cfg, lookup({("up-m", "p"): since}), TODAY)
    assert p.problem is None and [(e.effective_from, e.input) for e in p.add] == [(TODAY, Decimal("1.5"))]
    [p] = plan(config([]), lookup({("up-m", "p"): since}), TODAY)  # nothing priced yet: from the catalog's day
    assert [e.effective_from for e in p.add] == [date(2026, 10, 12)]
    [p] = plan(cfg, lookup({("up-m", "p"): since}), TODAY, date(2026, 11, 1))  # an explicit past date: refused
    assert p.add == [] and "would reprice billed usage" in p.problem
