"""Month-to-date quota arithmetic (pure): per-entity totals, dedup by event_id, limit states, alert
thresholds and the self-service view. The loop that feeds it lives in `quota_stream.py`.

Tokens that count against `tokens_per_month` are prompt + completion tokens of calls that reached a
provider (status ok or error); cache hits and rejections count nothing. Spend is the priced cost (Decimal).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from schemas.config import Limits
from services.billing.periods import bounds, iso

Scope = Literal["team", "key"]
Entity = tuple[Scope, str]
ZERO = Decimal(0)
BILLABLE = ("ok", "error")


@dataclass(slots=True)
class Usage:
    tokens: int = 0
    usd: Decimal = ZERO
    events: int = 0
    last_at: datetime | None = None

    def add(self, tokens: int, usd: Decimal, at: datetime | None) -> None:
        self.tokens += tokens
        self.usd += usd
        self.events += 1
        if at is not None and (self.last_at is None or at > self.last_at):
            self.last_at = at


@dataclass(slots=True)
class QuotaBook:
    """Month-to-date usage of one period per team and per key, and the event ids already counted.

    The id set is bounded (`max_ids`, oldest forgotten first): it guards against redelivery and replays,
    which arrive close to the original; the seed from ClickHouse covers everything older.
    """

    period: str
    max_ids: int = 2_000_000
    usage: dict[Entity, Usage] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def seed(self, entity: Entity, tokens: int, usd: Decimal, last_at: datetime | None) -> None:
        u = self.usage.setdefault(entity, Usage())
        u.tokens += tokens
        u.usd += usd
        if last_at is not None and (u.last_at is None or last_at > u.last_at):
            u.last_at = last_at

    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def add(self, event_id: str, team_id: str, key_id: str, tokens: int, usd: Decimal, at: datetime) -> bool:
        """Count one event for its team and key; False (and nothing counted) if it was counted before."""
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)
        for entity in (("team", team_id), ("key", key_id)):
            self.usage.setdefault(entity, Usage()).add(tokens, usd, at)  # type: ignore[arg-type]
        return True

    def get(self, entity: Entity) -> Usage:
        return self.usage.get(entity) or Usage()


def exhausted_by(usage: Usage, limits: Limits) -> str | None:
    """The limit a usage has reached, or None. Reaching a limit exactly exhausts it (nothing is left)."""
    if limits.tokens_per_month is not None and usage.tokens >= limits.tokens_per_month:
        return "tokens_per_month"
    if limits.budget_usd_per_month is not None and usage.usd >= limits.budget_usd_per_month:
        return "budget_usd_per_month"
    return None


def has_monthly_limit(limits: Limits) -> bool:
    return limits.tokens_per_month is not None or limits.budget_usd_per_month is not None


def near_limit(usage: Usage, limits: Limits, ratio: float) -> bool:
    """Worth a usage update to the proxies: at or past `ratio` of a monthly limit."""
    if limits.tokens_per_month is not None and usage.tokens >= limits.tokens_per_month * ratio:
        return True
    return limits.budget_usd_per_month is not None and usage.usd >= limits.budget_usd_per_month * Decimal(str(ratio))


def crossed_thresholds(usage: Usage, limits: Limits, thresholds: list[int]) -> list[tuple[str, int, Decimal, Decimal]]:
    """(metric, threshold %, used, limit) for every threshold the usage is at or past."""
    out: list[tuple[str, int, Decimal, Decimal]] = []
    pairs = (
        ("budget_usd", usage.usd, limits.budget_usd_per_month),
        (
            "tokens",
            Decimal(usage.tokens),
            None if limits.tokens_per_month is None else Decimal(limits.tokens_per_month),
        ),
    )
    for metric, used, limit in pairs:
        if limit is None or limit <= 0:
            continue
        for pct in thresholds:
            if used * 100 >= limit * pct:
                out.append((metric, pct, used, limit))
    return out


def _rate_per_hour(amount: Decimal, elapsed: timedelta) -> Decimal:
    hours = Decimal(max(elapsed.total_seconds(), 60.0)) / Decimal(3600)
    return amount / hours


def _exhaustion(now: datetime, reset: datetime, left: Decimal, rate_per_hour: Decimal) -> datetime | None:
    """When `left` runs out at `rate_per_hour`; None when that is not before the reset (or never).

    Compared in hours before building a datetime: a tiny burn rate would overflow datetime arithmetic.
    """
    if rate_per_hour <= 0:
        return None
    hours = left / rate_per_hour
    if hours >= Decimal((reset - now).total_seconds()) / Decimal(3600):
        return None
    return now + timedelta(hours=float(hours))


def quota_view(entity: Entity, usage: Usage, limits: Limits, period: str, now: datetime, state: str,
               reason: str | None) -> dict[str, object]:  # fmt: skip
    """What `GET /v1/quota` shows for one team or key. Burn rate is the month-to-date average per hour;
    the projected exhaustion is when that rate reaches the first limit (None if not before the reset)."""
    start, reset = bounds(period)
    elapsed = now - start
    tok_rate = _rate_per_hour(Decimal(usage.tokens), elapsed)
    usd_rate = _rate_per_hour(usage.usd, elapsed)
    remaining: dict[str, object] = {}
    projections: list[datetime | None] = []
    if limits.tokens_per_month is not None:
        left = max(0, limits.tokens_per_month - usage.tokens)
        remaining["tokens"] = left
        projections.append(_exhaustion(now, reset, Decimal(left), tok_rate))
    if limits.budget_usd_per_month is not None:
        left_usd = max(ZERO, limits.budget_usd_per_month - usage.usd)
        remaining["usd"] = _money(left_usd)
        projections.append(_exhaustion(now, reset, left_usd, usd_rate))
    found = [p for p in projections if p is not None]
    projected = min(found) if found else None
    if state == "exhausted":
        projected = now if projected is None else min(projected, now)
    return {
        "scope": entity[0],
        "id": entity[1],
        "limits": {
            "tokens_per_month": limits.tokens_per_month,
            "budget_usd_per_month": None
            if limits.budget_usd_per_month is None
            else _money(limits.budget_usd_per_month),
        },
        "used": {"tokens": usage.tokens, "usd": _money(usage.usd)},
        "remaining": remaining,
        "state": state,
        "reason": reason,
        "reset_at": iso(reset),
        "burn_rate": {"tokens_per_hour": int(tok_rate), "usd_per_hour": _money(usd_rate.quantize(Decimal("0.000001")))},
        "projected_exhaustion_at": iso(projected) if projected is not None and projected < reset else None,
    }


def _money(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"
