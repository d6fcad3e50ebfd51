"""Month-to-date quota arithmetic (pure): per-entity totals, dedup by event_id, limit states, alert
thresholds and the self-service view. The loop that feeds it lives in `quota_stream.py`.

What counts against a limit and when it is reached: schemas/quota.py (the proxies gate on the same rule).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from schemas.clock import iso
from schemas.config import Limits
from schemas.money import plain
from schemas.periods import bounds
from schemas.quota import limit_reached

Scope = Literal["team", "key", "end_user", "tag"]  # end_user, tag: schemas/budgets.py
Entity = tuple[Scope, str]
ZERO = Decimal(0)


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
class Counted:
    """An event the stream counted that the ledger does not hold yet (as far as billing last looked)."""

    team_id: str
    key_id: str
    tokens: int
    usd: Decimal
    at: datetime  # occurred_at
    counted_at: datetime  # billing's clock
    budgets: tuple[Entity, ...] = ()  # the budgeted end user / tag values it counted against


@dataclass(frozen=True, slots=True)
class Converged:
    changed: set[Entity]  # entities whose month-to-date total moved
    absorbed: int  # tail events the ledger now holds
    dropped: int  # tail events the meter never wrote (dropped or dead-lettered), or past max_tail: not counted


@dataclass(slots=True)
class QuotaBook:
    """Month-to-date usage of one period per team and per key: the ledger's totals as of its last settled
    cutoff (`settled`) plus the stream's tail (events counted since that the ledger did not have then).

    `converge` swaps in fresh ledger totals and drops from the tail what the ledger now holds, and what it
    never will (the meter wrote rows for `max_age` after the event was counted, but not this one: dropped
    or dead-lettered). So the month-to-date total is the ledger's whenever the stream has nothing newer.
    The id set is bounded (`max_ids`, oldest forgotten first): it guards against redelivery and replays,
    which arrive close to the original; the ledger covers everything older. The tail is bounded too
    (`max_tail`, ~300 B an entry): past it (the meter down for long at a high rate) the oldest entries stay
    in the totals only until the next convergence, then count once the ledger has them.
    """

    period: str
    max_ids: int = 2_000_000
    max_tail: int = 500_000
    settled: dict[Entity, Usage] = field(default_factory=dict)
    usage: dict[Entity, Usage] = field(default_factory=dict)  # settled + tail: what limits are judged on
    tail: OrderedDict[str, Counted] = field(default_factory=OrderedDict)  # by counted_at
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _overflowed: int = 0

    def seen(self, event_id: str) -> bool:
        return event_id in self._seen

    def add(self, event_id: str, team_id: str, key_id: str, tokens: int, usd: Decimal, at: datetime,
            counted_at: datetime | None = None, budgets: tuple[Entity, ...] = ()) -> bool:  # fmt: skip
        """Count one event for its team, key and budgeted entities; False (and nothing counted) if it was counted
        before."""
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)
        self.tail[event_id] = Counted(sys.intern(team_id), sys.intern(key_id), tokens, usd, at, counted_at or at,
                                      budgets)  # fmt: skip
        if len(self.tail) > self.max_tail:
            self.tail.popitem(last=False)
            self._overflowed += 1
        for entity in (("team", team_id), ("key", key_id), *budgets):
            self.usage.setdefault(entity, Usage()).add(tokens, usd, at)  # type: ignore[arg-type]
        return True

    def converge(self, settled: dict[Entity, Usage], in_ledger: set[str], meter_progress: datetime | None,
                 max_age: timedelta) -> Converged:  # fmt: skip
        """Ledger totals as of a settled cutoff, and the ids the ledger holds among those ingested since the
        previous one; what changed."""
        before = len(self.tail)
        for event_id in in_ledger:
            self.tail.pop(event_id, None)
        absorbed, dropped, self._overflowed = before - len(self.tail), self._overflowed, 0
        if meter_progress is not None:
            while self.tail:
                event_id, c = next(iter(self.tail.items()))
                if meter_progress - c.counted_at <= max_age:
                    break
                del self.tail[event_id]
                dropped += 1
        usage = {entity: Usage(u.tokens, u.usd, u.events, u.last_at) for entity, u in settled.items()}
        for c in self.tail.values():
            for entity in (("team", c.team_id), ("key", c.key_id), *c.budgets):
                usage.setdefault(entity, Usage()).add(c.tokens, c.usd, c.at)  # type: ignore[arg-type]
        none = Usage()
        changed = {e for e in usage.keys() | self.usage.keys()
                   if _amounts(usage.get(e, none)) != _amounts(self.usage.get(e, none))}  # fmt: skip
        self.settled, self.usage = settled, usage
        return Converged(changed, absorbed, dropped)

    def get(self, entity: Entity) -> Usage:
        return self.usage.get(entity) or Usage()


@dataclass(slots=True)
class DailySpend:
    """One UTC day's spend per entity with a daily alert threshold: the ledger's as of the seed, plus what the
    stream counts after it (the same dedup as the month's: only events `QuotaBook.add` counted arrive here)."""

    day: str  # YYYY-MM-DD
    usd: dict[Entity, Decimal] = field(default_factory=dict)

    def add(self, entity: Entity, usd: Decimal) -> None:
        self.usd[entity] = self.usd.get(entity, ZERO) + usd

    def get(self, entity: Entity) -> Decimal:
        return self.usd.get(entity, ZERO)


def _amounts(u: Usage) -> tuple[int, Decimal]:
    return u.tokens, u.usd


def exhausted_by(usage: Usage, limits: Limits) -> str | None:
    """The limit a usage has reached, or None (the rule: schemas/quota.py)."""
    return limit_reached(limits, usage.tokens, usage.usd)


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
        remaining["usd"] = plain(left_usd)
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
            "budget_usd_per_month": None if limits.budget_usd_per_month is None else plain(limits.budget_usd_per_month),
        },
        "used": {"tokens": usage.tokens, "usd": plain(usage.usd)},
        "remaining": remaining,
        "state": state,
        "reason": reason,
        "reset_at": iso(reset),
        "burn_rate": {"tokens_per_hour": int(tok_rate), "usd_per_hour": plain(usd_rate.quantize(Decimal("0.000001")))},
        "projected_exhaustion_at": iso(projected) if projected is not None and projected < reset else None,
    }
