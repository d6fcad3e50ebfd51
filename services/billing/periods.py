"""Billing periods at the API edge: a missing period is the current month, a bad one a 400 (the periods
themselves are schemas/periods.py)."""

from __future__ import annotations

from datetime import datetime

from schemas.periods import checked_period, period_of
from services.billing.errors import InvalidRequest


def parse_period(value: str | None, now: datetime) -> str:
    """`YYYY-MM`; None means the current month."""
    if value is None or value == "":
        return period_of(now)
    try:
        return checked_period(value)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
