"""Billing periods at the API edge: a missing period is the current month, a bad one a 400."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.periods import bounds, checked_period, next_period, period_of
from services.billing.errors import InvalidRequest

__all__ = ["bounds", "iso", "next_period", "parse_period", "period_of"]


def parse_period(value: str | None, now: datetime) -> str:
    """`YYYY-MM`; None means the current month."""
    if value is None or value == "":
        return period_of(now)
    try:
        return checked_period(value)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
