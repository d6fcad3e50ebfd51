"""Billing periods are UTC calendar months; one definition serves meter and billing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas.periods import bounds, checked_period, next_period, period_of


def test_bounds_are_half_open_utc_months_including_december_rollover():
    assert bounds("2026-02") == (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    assert bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert next_period("2026-12") == "2027-01"


def test_period_of_uses_utc_not_local_time():
    late_evening_in_new_york = datetime(2026, 1, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert period_of(late_evening_in_new_york) == "2026-02"


@pytest.mark.parametrize("bad", ["2026-13", "2026-1", "26-01", "2026/01", "", "1899-12", "2300-01", "x" * 50])
def test_bad_periods_are_rejected_naming_the_field(bad):
    with pytest.raises(ValueError, match="period: expected YYYY-MM"):
        checked_period(bad)


def test_good_period_is_returned_trimmed():
    assert checked_period(" 2026-11 ") == "2026-11"
