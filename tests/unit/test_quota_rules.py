"""The monthly quota rules (schemas/quota.py) that billing counts by and the proxies gate by."""

from __future__ import annotations

from decimal import Decimal

from schemas.config import Limits
from schemas.quota import has_monthly_limit, limit_reached, quota_tokens


def test_reaching_a_limit_exactly_exhausts_it_and_tokens_are_judged_first():
    both = Limits(tokens_per_month=100, budget_usd_per_month=Decimal("1.00"))
    assert limit_reached(both, 99, Decimal("0.99")) is None
    assert limit_reached(both, 100, Decimal("0")) == "tokens_per_month"
    assert limit_reached(both, 0, Decimal("1.00")) == "budget_usd_per_month"
    assert limit_reached(both, 100, Decimal("1.00")) == "tokens_per_month"
    assert limit_reached(Limits(), 10**12, Decimal(10**9)) is None


def test_a_zero_budget_is_exhausted_from_the_start():
    assert limit_reached(Limits(budget_usd_per_month=Decimal(0)), 0, Decimal(0)) == "budget_usd_per_month"


def test_only_monthly_fields_make_a_monthly_limit():
    assert not has_monthly_limit(Limits(rpm=10, tpm=1000))
    assert has_monthly_limit(Limits(tokens_per_month=1)) and has_monthly_limit(Limits(budget_usd_per_month=0))


def test_only_calls_that_reached_a_provider_count_tokens():
    assert quota_tokens("ok", 10, 5) == 15 and quota_tokens("error", 10, 5) == 15
    assert quota_tokens("cached", 10, 5) == 0 and quota_tokens("rejected", 10, 5) == 0
    # The SQL form (the ledger's quota seed) is held against this by the ledger integration tests.
