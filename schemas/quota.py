"""The monthly quota rules, for billing (which counts) and the proxies (which gate): what counts against
`tokens_per_month`, and when a limit is reached. The limits that apply are `schemas.control.monthly_limits`;
spend is the priced cost (schemas/prices.py)."""

from __future__ import annotations

from decimal import Decimal

from schemas.billed import BILLABLE_STATUSES, BILLABLE_STATUSES_SQL
from schemas.config import Limits

# Prompt + completion tokens of the calls that reached a provider (billable statuses); cache hits and
# rejections count nothing. The ledger's quota seed sums the SQL form.
QUOTA_TOKENS_SQL = f"if(status IN ({BILLABLE_STATUSES_SQL}), prompt_tokens + completion_tokens, 0)"


def quota_tokens(status: str, prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens + completion_tokens if status in BILLABLE_STATUSES else 0


def has_monthly_limit(limits: Limits) -> bool:
    return limits.tokens_per_month is not None or limits.budget_usd_per_month is not None


def limit_reached(limits: Limits, tokens: int, usd: Decimal) -> str | None:
    """The monthly limit that `tokens` and `usd` used have reached, or None. Reaching a limit exactly
    exhausts it (nothing is left)."""
    if limits.tokens_per_month is not None and tokens >= limits.tokens_per_month:
        return "tokens_per_month"
    if limits.budget_usd_per_month is not None and usd >= limits.budget_usd_per_month:
        return "budget_usd_per_month"
    return None
