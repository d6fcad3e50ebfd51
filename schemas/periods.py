"""Billing periods: UTC calendar months named `YYYY-MM`, shared by meter (re-rating) and billing (pure)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def period_of(t: datetime) -> str:
    t = t.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}"


def checked_period(value: str) -> str:
    """`value` if it names a month (years 1900-2299); ValueError naming the field otherwise."""
    m = _PERIOD.match(value.strip())
    if not m or not 1900 <= int(m.group(1)) <= 2299:
        raise ValueError(f"period: expected YYYY-MM, got {value[:20]!r}")
    return value.strip()


def bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of a period in UTC."""
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def next_period(period: str) -> str:
    return period_of(bounds(period)[1])
