"""The start check on price versions (pure part): which entries conflict with what was recorded, and the line."""

from __future__ import annotations

from datetime import date

from schemas.config import parse_config
from schemas.price_versions import conflicts, key, refusal, to_record
from schemas.prices import catalog

TODAY = date(2026, 12, 2)


def config(*prices: dict, route_prices: list[dict] | None = None):
    route = {"provider": "p", **({"prices": route_prices} if route_prices else {})}
    return parse_config({"providers": {"p": {"base_url": "http://x"}},
                         "models": {"m": {"routes": [route], "prices": list(prices)}}})  # fmt: skip


OLD = {"effective_from": "2026-01-01", "input": "2", "output": "8"}
NEXT = {"effective_from": "2027-01-01", "input": "1", "output": "4"}


def recorded(cfg):
    return {key(e): e.unit for e in to_record(cfg, {}, TODAY)}


def test_only_entries_in_force_are_recorded():
    assert [(e.model, e.effective_from) for e in to_record(config(OLD, NEXT), {}, TODAY)] == [("m", date(2026, 1, 1))]
    assert to_record(config(OLD, NEXT), recorded(config(OLD, NEXT)), TODAY) == []  # a restart records nothing


def test_an_unchanged_config_and_a_new_later_entry_do_not_conflict():
    seen = recorded(config(OLD, NEXT))
    assert conflicts(config(OLD, NEXT), seen, TODAY) == []
    assert conflicts(config(OLD, {"effective_from": "2026-12-01", "input": "3", "output": "8"}), seen, TODAY) == []


def test_an_in_place_edit_of_a_price_in_force_conflicts_and_the_line_says_how_to_change_a_price():
    seen = recorded(config(OLD))
    ((entry, was),) = conflicts(config({**OLD, "input": "2.5"}), seen, TODAY)
    line = refusal(entry, was)
    assert line.startswith("the price of m in force from 2026-01-01 was edited in place (input 2 output 8")
    assert "-> input 2.5 output 8" in line
    assert "new entry with a later effective_from" in line and "tollway rerate --period" in line
    assert "\n" not in line


def test_an_edit_of_a_price_not_yet_in_force_does_not_conflict():
    seen = recorded(config(OLD, NEXT))
    assert conflicts(config(OLD, {**NEXT, "input": "0.9"}), seen, TODAY) == []


def test_a_route_price_edit_is_named_by_its_route():
    seen = recorded(config(OLD, route_prices=[OLD]))
    assert len(list(catalog(config(OLD, route_prices=[OLD])))) == 2
    ((entry, was),) = conflicts(config(OLD, route_prices=[{**OLD, "output": "9"}]), seen, TODAY)
    assert refusal(entry, was).startswith("the price of m (route p) in force from 2026-01-01")


def test_the_same_price_written_differently_is_no_edit():
    seen = recorded(config(OLD))
    assert conflicts(config({**OLD, "input": "2.000", "cached_input": "2"}), seen, TODAY) == []
