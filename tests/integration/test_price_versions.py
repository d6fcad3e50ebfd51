"""Price versions recorded in the real ClickHouse engine; a start that edits a price in force is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.config import parse_config
from schemas.price_versions import PriceEditedInPlace, check_and_record, record_in_force
from schemas.prices import PriceBook
from tollway.runtime import check_prices_or_exit


def config(*prices: dict):
    return parse_config({"providers": {"p": {"base_url": "http://x"}},
                         "models": {"m": {"routes": [{"provider": "p"}], "prices": list(prices)}}})  # fmt: skip


async def priced_one_event(store, cfg, day: str) -> str:
    """Store a usage row priced with `cfg`'s price for model m on `day`; returns the version it carries."""
    when = datetime.fromisoformat(day).replace(tzinfo=UTC)
    version = PriceBook(cfg).at("m", "p", when).version
    await store.insert_rows("usage_events", [[str(uuid.uuid4()), when, "team", "m", True, version]],
                            ["event_id", "occurred_at", "team_id", "served_model", "priced", "price_version"])  # fmt: skip
    return version


async def recorded(store) -> list[tuple]:
    rows = await store.query("SELECT model, effective_from, unit_input FROM {db}.price_versions FINAL "
                             "ORDER BY effective_from")  # fmt: skip
    return [(m, d, format(u.normalize(), "f")) for m, d, u in rows]


async def test_an_in_place_edit_of_a_price_that_priced_usage_stops_the_start(store, capsys):
    today = datetime.now(UTC).date()
    in_force = {"effective_from": "2025-04-14", "input": "2.00", "output": "8.00"}
    later = {"effective_from": (today + timedelta(days=30)).isoformat(), "input": "1", "output": "4"}
    assert await check_and_record(store, config(in_force, later), "meter") == 1  # only the one in force
    assert await check_and_record(store, config(in_force, later), "billing") == 0  # a restart: nothing new
    await priced_one_event(store, config(in_force, later), "2025-05-01")

    edited = config({**in_force, "input": "2.10"}, later)
    with pytest.raises(PriceEditedInPlace, match="m in force from 2025-04-14 was edited in place"):
        await check_and_record(store, edited, "meter")
    with pytest.raises(SystemExit) as exit_:
        await check_prices_or_exit(store, edited, "meter")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "add a new entry with a later effective_from" in err and "tollway rerate" in err

    # Allowed: editing the entry not yet in force, and changing the price by a new, later entry.
    change = {"effective_from": today.isoformat(), "input": "2.10", "output": "8.00"}
    assert await check_and_record(store, config(in_force, change, {**later, "input": "0.9"}), "meter") == 1
    assert await recorded(store) == [("m", "2025-04-14", "2"), ("m", today.isoformat(), "2.1")]
    # Once the later entry comes into force it is recorded (the meter's periodic pass) and, once used, frozen.
    soon = date.fromisoformat(later["effective_from"])
    now_cfg = config(in_force, change, {**later, "input": "0.9"})
    assert await record_in_force(store, now_cfg, "meter", soon) == 1
    await priced_one_event(store, now_cfg, soon.isoformat())
    with pytest.raises(PriceEditedInPlace, match=f"in force from {soon}"):
        await check_and_record(store, config(in_force, change, later), "meter", soon)


async def test_a_mistyped_price_that_priced_nothing_may_be_corrected_in_place(store):
    typo = {"effective_from": "2025-04-14", "input": "200000", "output": "8"}
    assert await check_and_record(store, config(typo), "up") == 1
    # Every event it met became a dead letter (its cost did not fit): no row or adjustment carries it.
    assert await check_and_record(store, config({**typo, "input": "2"}), "up") == 1
    assert await recorded(store) == [("m", "2025-04-14", "2")]
    await priced_one_event(store, config({**typo, "input": "2"}), "2025-05-01")
    with pytest.raises(PriceEditedInPlace):  # the correction has priced usage now: frozen
        await check_and_record(store, config(typo), "up")


async def test_rows_priced_before_versions_had_a_hash_freeze_the_price_too(store):
    price = {"effective_from": "2025-04-14", "input": "2", "output": "8"}
    assert await check_and_record(store, config(price), "up") == 1  # the first start after the upgrade
    await store.insert_rows("usage_events", [[str(uuid.uuid4()), datetime(2025, 5, 1, tzinfo=UTC), "team", "m",
                                              True, "m/*@2025-04-14"]],
                            ["event_id", "occurred_at", "team_id", "served_model", "priced", "price_version"])  # fmt: skip
    with pytest.raises(PriceEditedInPlace):
        await check_and_record(store, config({**price, "input": "3"}), "up")


async def test_a_price_version_reads_back_whole_in_every_dimension(store):
    import hashlib

    from schemas.price_versions import recorded_price_sets

    whole = {"effective_from": "2025-04-14", "input": "3", "output": "15", "cached_input": "0.30",
             "cache_write": "3.75", "cache_write_1h": "6", "request": "0.002", "web_search": "10",
             "long_context": {"above_prompt_tokens": 200_000, "input": "6", "output": "22.50", "cached_input": "0.6"},
             "service_tiers": {"priority": {"input": "5", "output": "20"},
                               "batch": {"input": "1.5", "output": "7.5",
                                         "long_context": {"input": "3", "output": "11.25"}}}}  # fmt: skip
    plain = {"effective_from": "2026-01-01", "input": "2", "output": "8"}
    cfg = config(whole, plain)
    assert await check_and_record(store, cfg, "meter") == 2
    back = await recorded_price_sets(store)
    for when in ("2025-05-01", "2026-02-01"):
        entry = PriceBook(cfg).at("m", "p", datetime.fromisoformat(when).replace(tzinfo=UTC))
        got = back[("m", "*", entry.version.split("@")[1].split("#")[0])]
        assert got == entry  # every set and every unit price, Decimal for Decimal (the dataclasses compare them)
        assert sorted(u.tier for u in got.units()) == sorted(u.tier for u in entry.units())
    got = back[("m", "*", "2025-04-14")]
    assert (got.base.cache_write, got.base.request, got.web_search) == (Decimal("3.75"), Decimal("0.002"), 10)
    assert got.long_context[0] == 200_000 and got.tiers_long_context["batch"].output == Decimal("11.25")
    # the recorded text is what the version hashes: the record proves its version
    rows = await store.query("SELECT version, identity FROM {db}.price_versions FINAL")
    for version, identity in rows:
        assert version.endswith("#" + hashlib.sha256(identity.encode()).hexdigest()[:8]), version


async def test_a_record_from_before_every_dimension_was_kept_is_written_again_whole(store):
    from schemas.price_versions import partial_records, recorded_price_sets

    price = {"effective_from": "2025-04-14", "input": "3", "output": "15", "request": "0.002"}
    entry = PriceBook(config(price)).at("m", "p", datetime(2025, 5, 1, tzinfo=UTC))
    # as the 030 code wrote it: the three base prices, nothing else
    await store.insert_rows("price_versions", [["m", "*", "2025-04-14", entry.version, Decimal(3), Decimal(15),
                                                Decimal(3), datetime(2025, 4, 14, tzinfo=UTC), "meter"]],
                            ["model", "provider", "effective_from", "version", "unit_input", "unit_output",
                             "unit_cached_input", "recorded_at", "recorded_by"])  # fmt: skip
    assert await partial_records(store) == {("m", "*", "2025-04-14")}
    assert await recorded_price_sets(store) == {}  # a partial record is not passed off as the whole price
    assert await record_in_force(store, config(price), "meter") == 1  # the same version, written whole
    assert await partial_records(store) == frozenset()
    assert (await recorded_price_sets(store))[("m", "*", "2025-04-14")] == entry
    assert await check_and_record(store, config(price), "meter") == 0  # and then nothing more to write
