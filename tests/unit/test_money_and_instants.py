"""Money and instants have one wire form for every service (schemas/money.py, schemas/clock.py)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from schemas.clock import iso, utc
from schemas.money import cents, plain, usd


def test_billed_amounts_round_once_half_even_to_cents():
    assert cents(Decimal("0.125")) == Decimal("0.12")
    assert cents(Decimal("0.135")) == Decimal("0.14")
    assert usd(Decimal("1.5")) == "1.50"
    assert usd(Decimal("0E-18")) == "0.00"
    assert usd(Decimal("-1.005")) == "-1.00"  # a signed adjustment: half-even on the magnitude


def test_exact_amounts_are_plain_and_every_zero_is_zero():
    assert plain(Decimal("1.500000000000000000")) == "1.5"
    assert plain(Decimal("1E+2")) == "100"
    assert plain(Decimal("-0.000")) == "0"
    assert plain(Decimal("-2.50")) == "-2.5"


@pytest.fixture
def new_york_host():
    """This process's local time zone is New York for the test (a host that is not on UTC)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_a_naive_instant_is_utc_on_any_host(new_york_host):
    # ClickHouse returns DateTime64(.., 'UTC') columns as naive datetimes: they are UTC, not host time.
    assert iso(datetime(2026, 11, 1, 0, 0)) == "2026-11-01T00:00:00Z"
    assert utc(datetime(2026, 11, 1, 0, 0)) == datetime(2026, 11, 1, tzinfo=UTC)


def test_an_aware_instant_is_shown_in_utc_with_z():
    est = timezone(timedelta(hours=-5))
    assert iso(datetime(2026, 10, 31, 20, 0, 0, 123000, tzinfo=est)) == "2026-11-01T01:00:00.123000Z"
    assert iso(datetime(2026, 11, 1, tzinfo=UTC)) == "2026-11-01T00:00:00Z"
