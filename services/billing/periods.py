"""Billing periods are UTC calendar months named `YYYY-MM`: parsing, bounds and rollover (pure)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from services.billing.errors import InvalidRequest

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def period_of(t: datetime) -> str:
    t = t.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}"


def parse_period(value: str | None, now: datetime) -> str:
    """`YYYY-MM`; None means the current month."""
    if value is None or value == "":
        return period_of(now)
    m = _PERIOD.match(value.strip())
    if not m or not 1900 <= int(m.group(1)) <= 2299:
        raise InvalidRequest(f"period: expected YYYY-MM, got {value[:20]!r}")
    return value.strip()


def bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of a period in UTC."""
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def next_period(period: str) -> str:
    return period_of(bounds(period)[1])


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
