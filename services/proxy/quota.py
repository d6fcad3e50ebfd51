"""The proxy's monthly quota gate: billing's signals, local counting between them, worst-case reservations.

For every team and key with a monthly limit (tokens_per_month, budget_usd_per_month) the gate knows
  billing  = the month-to-date total in billing's last usage update (QuotaSignal with used_*),
  pending  = what calls through this proxy used that billing has not acknowledged counting (by event id;
             kept until acknowledged, or `pending_max_s` when billing stays silent that long),
  reserved = the worst case of calls in flight here (prompt estimate + max_tokens at the dearest rates, plus
             the request fee and the fees of the web searches its tools may run; see `worst_case_web_searches`).
A call is admitted while billing + pending + reserved is below the limit and no exhausted signal holds;
it then reserves its worst case, settled to the actual usage when the call ends (`settle`, from the
handler's single exit). So a limit bites here the moment local counting crosses it, and everywhere else
when billing's exhausted signal lands; concurrent calls overshoot by at most what was reserved in flight
when the limit was reached (per proxy), plus what other proxies served before the signal reached them.
That holds with billing down or lagging, up to `pending_max_s` (docs/metering.md, "Quota = ledger").
End-user and tag budgets (schemas/budgets.py, `Budget` control messages) are entities like teams and keys:
a call counts against its end user's and its tags' budgets when they have one; a call without one adds no
state. Their states are capped at `BUDGET_STATES_MAX` (idle ones evicted oldest first; see `_touch`).
The month is billing's (the latest period its signals carry), not this host's clock: a proxy whose clock runs
into the next month early does not drop billing's totals and exhausted states, nor one that lags keep them.
This clock rules only when it is in a later month and billing has been silent for `BILLING_SILENT_S` (down
over the month's end); silence is timed on the monotonic clock, which a wrong wall clock does not move.
"""

from __future__ import annotations

import time
from calendar import monthrange
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client import Counter, Histogram

from schemas.billed import billed_model
from schemas.budgets import Budget, BudgetIndex
from schemas.config import GatewayConfig, Limits
from schemas.control import KeyState, QuotaSignal, Snapshot, TeamState, monthly_limits
from schemas.periods import period_of
from schemas.prices import PriceBook, price_usage
from schemas.quota import has_monthly_limit, limit_reached, quota_tokens
from services.proxy.draft import UsageDraft
from services.proxy.errors import QuotaExceeded
from services.proxy.tokens import worst_case_tokens

ZERO = Decimal(0)
Entity = tuple[str, str]

REJECTIONS = Counter("tollway_quota_rejections_total", "Calls refused for monthly quota", ["scope", "source"])
FIRST_429 = Histogram(
    "tollway_quota_crossing_to_first_429_seconds",
    "From the end of the call that crossed a monthly limit to this proxy's first 429 insufficient_quota",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PENDING_EXPIRED = Counter(
    "tollway_quota_pending_expired_total",
    "Local usage entries forgotten unacknowledged after pending_max_s (billing down or lagging that long)",
)
SIGNAL_LAG = Histogram(
    "tollway_quota_signal_lag_seconds",
    "From the end of the call that crossed a monthly limit to billing's exhausted signal reaching this proxy",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# A body that offers a server-side web search may run searches, each billed at the price's web_search fee: the
# reservation counts a tool's own cap (Anthropic's `max_uses`) or, without one, this many (settled to the
# searches the provider reports when the call ends).
WEB_SEARCHES_RESERVED = 10
MAX_USES_CAP = 1_000  # a larger max_uses is counted as this: a reservation, not a promise


def worst_case_web_searches(body: dict[str, Any]) -> int:
    """How many web searches the call may be billed: its web search tools (Responses' `web_search`,
    `web_search_preview*`; Anthropic's `web_search_2025...`) at their cap, or 1 for chat's `web_search_options`
    (a search model searches once a call)."""
    n = 0
    tools = body.get("tools")
    if isinstance(tools, list):
        for t in tools:
            kind = t.get("type") if isinstance(t, dict) else None
            if isinstance(kind, str) and kind.startswith("web_search"):
                cap = t.get("max_uses")
                ok = isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0
                n += min(cap, MAX_USES_CAP) if ok else WEB_SEARCHES_RESERVED
    if not n and isinstance(body.get("web_search_options"), dict):
        n = 1
    return n


def seconds_to_reset(now: datetime) -> int:
    days = monthrange(now.year, now.month)[1]
    end = datetime(now.year, now.month, days, tzinfo=UTC).timestamp() + 86400
    return max(1, int(end - now.timestamp()))


@dataclass(slots=True)
class EntityState:
    billing_tokens: int = 0
    billing_usd: Decimal = ZERO
    billing_period: str | None = None
    pending: OrderedDict[str, tuple[float, int, Decimal]] = field(default_factory=OrderedDict)
    pending_tokens: int = 0
    pending_usd: Decimal = ZERO
    reserved_tokens: int = 0
    reserved_usd: Decimal = ZERO
    exhausted: QuotaSignal | None = None
    exhausted_gen: int = 0
    crossed_at: datetime | None = None  # start of the crossing-to-first-429 lag
    first_429_seen: bool = True

    def used(self, period: str) -> tuple[int, Decimal]:
        base_t, base_u = (self.billing_tokens, self.billing_usd) if self.billing_period == period else (0, ZERO)
        return (base_t + self.pending_tokens + self.reserved_tokens, base_u + self.pending_usd + self.reserved_usd)

    def forget(self, event_id: str) -> None:
        entry = self.pending.pop(event_id, None)
        if entry is not None:
            self.pending_tokens -= entry[1]
            self.pending_usd -= entry[2]

    def prune(self, now_mono: float, max_s: float) -> None:
        while self.pending:
            event_id, (at, _, _) = next(iter(self.pending.items()))
            if now_mono - at <= max_s:
                break
            self.forget(event_id)
            PENDING_EXPIRED.inc()


@dataclass(frozen=True, slots=True)
class Reservation:
    entities: tuple[Entity, ...]
    tokens: int
    usd: Decimal


class QuotaGate:
    # Billing acknowledges within a second when it keeps up; 15 minutes covers a billing restart and its
    # replay with room to spare. Memory: ~200 B per entry, i.e. ~35 MB at 200 gated calls/s for 15 minutes.
    PENDING_MAX_S = 900.0
    BILLING_SILENT_S = 3600.0
    # End-user / tag budget states kept (~1 KB each idle, measured with tracemalloc over 50k end users: ~50 MB
    # at the cap): a team's default budget makes every end user an entity. Past the cap, idle ones (nothing
    # reserved, pending or exhausted) go, oldest first; one evicted loses only billing's last total, which
    # billing re-sends with its next update for it.
    BUDGET_STATES_MAX = 50_000

    def __init__(self, config: GatewayConfig, default_max_tokens: int = 1024,
                 pending_max_s: float = PENDING_MAX_S) -> None:  # fmt: skip
        self.config = config
        self.prices = PriceBook(config)
        self.default_max_tokens = default_max_tokens
        self.pending_max_s = pending_max_s
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.billing_period: str | None = None  # the latest month billing's signals named
        self._billing_heard = 0.0  # monotonic: when billing last published a quota state or a snapshot
        self.states: dict[Entity, EntityState] = {}
        self.reservations: dict[str, Reservation] = {}
        self.teams: dict[str, TeamState] = {}
        self._limits: dict[str, tuple[Any, Limits]] = {}
        self._team_limits: dict[str, tuple[TeamState, Limits]] = {}  # per team state object, like keys'
        self.budgets = BudgetIndex()
        self._budget_lru: OrderedDict[Entity, None] = OrderedDict()
        self._gen = 0

    # -- control topic ------------------------------------------------------------------------------

    def on_control(self, msg: Any) -> None:
        if isinstance(msg, TeamState):
            self.teams[msg.team_id] = msg
        elif isinstance(msg, Budget):
            self.budgets.put(msg)
        elif isinstance(msg, QuotaSignal):
            self._on_signal(msg)
        elif isinstance(msg, Snapshot):
            self._billing_heard = time.monotonic()
            # A full state re-asserts every exhausted entity; one not re-asserted since the previous
            # Snapshot is stale (its billing restarted into a new month, or a limit was raised meanwhile).
            self._gen += 1
            for st in self.states.values():
                if st.exhausted is not None and st.exhausted_gen < self._gen - 1:
                    st.exhausted = None

    def _on_signal(self, msg: QuotaSignal) -> None:
        self._billing_heard = time.monotonic()
        if msg.period is not None and (self.billing_period is None or msg.period > self.billing_period):
            self.billing_period = msg.period
        st = self._state((msg.scope, msg.id))
        if msg.used_tokens is not None:
            st.billing_tokens, st.billing_usd, st.billing_period = msg.used_tokens, msg.used_usd or ZERO, msg.period
        for event_id in msg.counted:
            st.forget(event_id)
        if msg.state == "exhausted":
            if st.exhausted is None and msg.crossed_at is not None:
                SIGNAL_LAG.observe(max(0.0, (datetime.now(UTC) - msg.crossed_at).total_seconds()))
                if st.crossed_at is None or msg.crossed_at < st.crossed_at:
                    st.crossed_at, st.first_429_seen = msg.crossed_at, False
            st.exhausted, st.exhausted_gen = msg, self._gen
        else:
            st.exhausted = None
            if msg.reason in ("restored", "new_period"):
                st.crossed_at, st.first_429_seen = None, True
            if msg.reason == "new_period":  # a restore keeps them: billing acknowledges them right after
                st.pending.clear()
                st.pending_tokens, st.pending_usd = 0, ZERO

    # -- the request path ---------------------------------------------------------------------------

    def limits(self, key: KeyState) -> tuple[Limits | None, Limits]:
        """(team limits or None when the team is unknown here, key limits), cached per state object."""
        team = self.teams.get(key.team_id)
        hit = self._limits.get(key.key_id)
        if hit is not None and hit[0][0] is key and hit[0][1] is team:
            return hit[1]  # type: ignore[return-value]
        out = (
            self._team_limit(team),
            monthly_limits(self.config, "key", key.plan, key.limits),
        )
        self._limits[key.key_id] = ((key, team), out)  # type: ignore[assignment]
        return out

    def worst_case(self, body: dict[str, Any]) -> tuple[int, Decimal]:
        most = worst_case_tokens(body, self.default_max_tokens)
        model = self.config.resolve(str(body.get("model", ""))) or ""
        entry = self.prices.at(model, "*", datetime.now(UTC)) if model else None
        usd = ZERO
        if entry is not None:
            usd = entry.worst_case_usd(most.prompt_tokens, most.completion_tokens, worst_case_web_searches(body))
        return most.prompt_tokens + most.completion_tokens, usd

    def admit(self, event_id: str, key: KeyState, body: dict[str, Any], end_user: str | None = None,
              tags: dict[str, str] | None = None) -> None:  # fmt: skip
        """Raise QuotaExceeded, or reserve the call's worst case under its event id. `end_user` and `tags`:
        the call's, for their budgets (schemas/budgets.py)."""
        team_limits, key_limits = self.limits(key)
        scoped = [(("key", key.key_id), key_limits)]
        if team_limits is not None:
            scoped.append((("team", key.team_id), team_limits))
        if self.budgets.has_team(key.team_id):
            scoped += [(entity, b.limits) for entity, b in self.budgets.entities(key.team_id, end_user, tags or {})]
        scoped = [(e, lim) for e, lim in scoped if has_monthly_limit(lim)]
        if not scoped:
            return
        now = self.clock()
        period, mono = self.period(now), time.monotonic()
        for entity, lim in scoped:
            st = self._state(entity)
            st.prune(mono, self.pending_max_s)
            source = None
            if st.exhausted is not None and st.exhausted.period == period:
                source = "signal"
            elif limit_reached(lim, *st.used(period)):
                source = "local"
            if source is not None:
                self._reject(entity, st, source, now)
        tokens, usd = self.worst_case(body)
        for entity, _ in scoped:
            st = self.states[entity]
            st.reserved_tokens += tokens
            st.reserved_usd += usd
        self.reservations[event_id] = Reservation(tuple(e for e, _ in scoped), tokens, usd)

    def period(self, now: datetime) -> str:
        """The month quotas are judged in: billing's, unless this clock is well past its end."""
        own = period_of(now)
        if self.billing_period is None or own == self.billing_period:
            return own
        if own > self.billing_period and time.monotonic() - self._billing_heard > self.BILLING_SILENT_S:
            return own  # billing silent since before this clock's month began: it may be down over the roll
        return self.billing_period

    def _reject(self, entity: Entity, st: EntityState, source: str, now: datetime) -> None:
        REJECTIONS.labels(entity[0], source).inc()
        if not st.first_429_seen and st.crossed_at is not None:
            st.first_429_seen = True
            FIRST_429.observe(max(0.0, (now - st.crossed_at).total_seconds()))
        what = {"team": "team", "key": "API key", "end_user": "end user", "tag": "tag value"}.get(entity[0], entity[0])
        raise QuotaExceeded(
            f"You exceeded the monthly quota of this {what}; it resets at the start of next month (UTC) "
            "or when the limit is raised.",
            headers={"retry-after": str(seconds_to_reset(now))},
        )

    def settle(self, event: UsageDraft) -> None:
        """The call ended: swap its reservation for what it actually used (counted until billing has it)."""
        r = self.reservations.pop(event.event_id, None)
        if r is None:
            return
        tokens = quota_tokens(event.status, event.prompt_tokens, event.completion_tokens)
        usd = ZERO
        if tokens and event.quoted_cost_usd:  # priced once already, for the caller (services/proxy/cost.py)
            usd = Decimal(event.quoted_cost_usd)
        elif tokens:
            model = billed_model(event.served_model, event.requested_model)
            priced = price_usage(self.prices, model, event.provider, datetime.now(UTC), event.status, event,
                                 event.service_tier)  # fmt: skip
            if priced.unit is not None:
                usd = priced.cost.total
        now, mono = self.clock(), time.monotonic()
        period = self.period(now)
        for entity in r.entities:
            st = self._state(entity)
            st.reserved_tokens -= r.tokens
            st.reserved_usd -= r.usd
            if not tokens:
                continue
            st.pending[event.event_id] = (mono, tokens, usd)
            st.pending_tokens += tokens
            st.pending_usd += usd
            if st.crossed_at is None:
                lim = self._limit_of(entity)
                used_t, used_u = st.used(period)
                used_t, used_u = used_t - st.reserved_tokens, used_u - st.reserved_usd  # actual usage only
                if lim is not None and limit_reached(lim, used_t, used_u):
                    st.crossed_at, st.first_429_seen = now, False

    def _state(self, entity: Entity) -> EntityState:
        st = self.states.get(entity)
        if st is None:
            st = self.states[entity] = EntityState()
        if entity[0] in ("end_user", "tag"):
            self._touch(entity)
        return st

    def _touch(self, entity: Entity) -> None:
        """Budget states, most recently used last; past the cap the oldest idle ones go (a few per call, so
        no call pays for a long scan)."""
        lru = self._budget_lru
        lru[entity] = None
        lru.move_to_end(entity)
        for _ in range(4):
            if len(lru) <= self.BUDGET_STATES_MAX:
                return
            old = next(iter(lru))
            st = self.states.get(old)
            lru.move_to_end(old)
            if st is not None and (st.exhausted is not None or st.pending or st.reserved_tokens or st.reserved_usd):
                continue
            del lru[old]
            self.states.pop(old, None)

    def _limit_of(self, entity: Entity) -> Limits | None:
        if entity[0] in ("end_user", "tag"):
            b = self.budgets.get(entity)
            return None if b is None else b.limits
        if entity[0] == "key":
            hit = self._limits.get(entity[1])
            return hit[1][1] if hit else None
        return self._team_limit(self.teams.get(entity[1]))

    def _team_limit(self, team: TeamState | None) -> Limits | None:
        if team is None:
            return None
        hit = self._team_limits.get(team.team_id)
        if hit is not None and hit[0] is team:
            return hit[1]
        lim = monthly_limits(self.config, "team", team.plan, team.limits)
        self._team_limits[team.team_id] = (team, lim)
        return lim
