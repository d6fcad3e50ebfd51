"""UTC instants shared by every service: their wire form, and how far an event's occurred_at (the proxy's
clock) may run ahead of the clock of whoever reads it.

Beyond the tolerance an event is from the future: stored or counted, it would open a month no invoice has
reached and roll every quota. The meter holds such events as dead letters (services/meter/reference.py); any
other reader of the usage stream should apply this same rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

FUTURE_TOLERANCE_S = 300.0  # the meter's default (MeterSettings.future_tolerance_s)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(t: datetime) -> datetime:
    """`t` in UTC; a naive datetime (as ClickHouse returns DateTime64(.., 'UTC') columns) is UTC already."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def iso(t: datetime) -> str:
    """The API's form of an instant: ISO 8601 in UTC with a `Z` ('2026-11-01T00:00:00Z')."""
    return utc(t).isoformat().replace("+00:00", "Z")


def future_cutoff(now: datetime, tolerance_s: float = FUTURE_TOLERANCE_S) -> tuple[int, datetime]:
    """(H, the first instant past it): an event is from the future when its occurred_at floored to the
    millisecond (as ClickHouse stores it) is after H = now + tolerance, in epoch ms; equivalently when
    occurred_at >= the returned instant."""
    horizon_ms = int(now.timestamp() * 1000) + int(tolerance_s * 1000)
    return horizon_ms, _EPOCH + timedelta(milliseconds=horizon_ms + 1)
