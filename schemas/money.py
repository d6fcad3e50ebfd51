"""How money is shown and rounded, for every service: exact plain notation for metered amounts, whole cents
(ROUND_HALF_EVEN, rounded once) for what an invoice or report bills."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

CENT = Decimal("0.01")


def cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


def usd(value: Decimal) -> str:
    """A billed amount: whole cents, always two decimals ('1.50')."""
    return str(cents(value))


def plain(value: Decimal) -> str:
    """An exact amount in plain notation without trailing zeros: Decimal('1.500000000000000000') -> '1.5',
    any zero (0E-18, -0) -> '0'."""
    return format(value.normalize(), "f") if value else "0"
