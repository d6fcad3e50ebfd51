"""Price versions recorded in the real ClickHouse engine; a start that edits a price in force is refused."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from schemas.config import parse_config
from schemas.price_versions import PriceEditedInPlace, check_and_record, record_in_force
from tollway.runtime import check_prices_or_exit


def config(*prices: dict):
    return parse_config({"providers": {"p": {"base_url": "http://x"}},
                         "models": {"m": {"routes": [{"provider": "p"}], "prices": list(prices)}}})  # fmt: skip


async def test_an_in_place_edit_of_a_recorded_price_stops_the_start_and_a_new_entry_does_not(store, capsys):
    today = datetime.now(UTC).date()
    in_force = {"effective_from": "2025-04-14", "input": "2.00", "output": "8.00"}
    later = {"effective_from": (today + timedelta(days=30)).isoformat(), "input": "1", "output": "4"}
    assert await check_and_record(store, config(in_force, later), "meter") == 1  # only the one in force
    assert await check_and_record(store, config(in_force, later), "billing") == 0  # a restart: nothing new

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
    rows = await store.query("SELECT model, effective_from, unit_input FROM {db}.price_versions FINAL "
                             "ORDER BY effective_from")  # fmt: skip
    assert [(m, d, str(u.normalize())) for m, d, u in rows] == [("m", "2025-04-14", "2"),
                                                                ("m", today.isoformat(), "2.1")]  # fmt: skip
    # Once the later entry comes into force it is recorded (the meter's periodic pass) and frozen too.
    soon = date.fromisoformat(later["effective_from"])
    assert await record_in_force(store, config(in_force, change, {**later, "input": "0.9"}), "meter", soon) == 1
    with pytest.raises(PriceEditedInPlace, match=f"in force from {soon}"):
        await check_and_record(store, config(in_force, change, later), "meter", soon)
