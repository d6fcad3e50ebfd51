"""Control messages on `tollway.control.v1`: billing -> every proxy.

Each proxy replica reads the whole topic from the beginning (no consumer group) and folds the messages
into an in-memory view; billing republishes the full state on start, so the view converges even on an
in-memory broker that lost history.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.budgets import Budget
from schemas.config import GatewayConfig, Limits

CONTROL_TOPIC = "tollway.control.v1"
ALERTS_TOPIC = "tollway.alerts.v1"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TeamState(_Msg):
    kind: Literal["team"] = "team"
    team_id: str
    name: str
    plan: str | None = None
    limits: Limits = Field(default_factory=Limits)


class KeyState(_Msg):
    """A key as the proxy needs it: only the hash of the secret ever leaves billing."""

    kind: Literal["key"] = "key"
    key_id: str
    key_hash: str
    prefix: str
    team_id: str
    name: str | None = None
    plan: str | None = None
    limits: Limits = Field(default_factory=Limits)
    metadata: dict[str, str] = Field(default_factory=dict)
    expires_at: datetime | None = None
    revoked: bool = False
    # Set on the message billing publishes when `expires_at` passes (the proxy checks expires_at anyway).
    expired: bool = False


class QuotaSignal(_Msg):
    """A team's, key's or budget's (schemas/budgets.py: end_user, tag) monthly quota state. `state="ok"` with
    `used_*` set is a usage update: billing sends those for entities near a limit, so a proxy can count locally
    on top of billing's total."""

    kind: Literal["quota"] = "quota"
    scope: Literal["team", "key", "end_user", "tag"]
    id: str
    state: Literal["ok", "exhausted"]
    reason: str | None = None
    period: str | None = None
    # Month-to-date totals billing has counted (None on messages from before these fields existed).
    used_tokens: int | None = None
    used_usd: Decimal | None = None
    limit_tokens: int | None = None
    limit_usd: Decimal | None = None
    # When the call that crossed the limit finished (UTC): the start of the crossing-to-429 lag.
    crossed_at: datetime | None = None
    as_of: datetime | None = None
    # Event ids billing counted for this entity since its previous update: a proxy drops them from its
    # local not-yet-counted ledger, so nothing is counted twice or forgotten.
    counted: list[str] = Field(default_factory=list)


class Snapshot(_Msg):
    """Marks the end of a full-state republish: a proxy that saw it holds a complete view."""

    kind: Literal["snapshot"] = "snapshot"
    published_at: datetime
    keys: int
    teams: int
    quota_states: int = 0


class BudgetAlert(BaseModel):
    """On `tollway.alerts.v1` (and the optional webhook): a team, key or budget crossed a threshold of a monthly
    limit, or a UTC day's spend crossed its `daily_alert_usd` (metric "daily_usd", period the day YYYY-MM-DD,
    threshold 100). Exactly one per (scope, id, period, metric, threshold). A budget's alert names its entity
    (`end_user`, or `tag` and `value`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["budget_alert"] = "budget_alert"
    alert_id: str
    scope: Literal["team", "key", "end_user", "tag"]
    id: str
    team_id: str
    period: str
    metric: Literal["budget_usd", "tokens", "daily_usd"]
    threshold_pct: int
    used: Decimal
    limit: Decimal
    crossed_at: datetime
    end_user: str | None = None
    tag: str | None = None
    value: str | None = None


def monthly_limits(config: GatewayConfig, scope: str, plan: str | None, own: Limits) -> Limits:
    """The monthly limits that apply to a team or key: its plan's, overridden by its own.

    A team without a plan gets the default plan; a key without a plan has only its own overrides (the
    team's limits still apply at team scope). Shared by billing (which counts) and proxies (which gate).
    """
    if plan is None and scope == "team":
        plan = config.default_plan
    base = config.plans.get(plan) if plan else None
    merged = Limits() if base is None else Limits(**base.model_dump(include=set(Limits.model_fields)))
    return merged.overlay(own)


ControlMessage = Annotated[TeamState | KeyState | QuotaSignal | Snapshot | Budget, Field(discriminator="kind")]
_adapter: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)


def encode(msg: TeamState | KeyState | QuotaSignal | Snapshot | Budget) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def decode(raw: bytes) -> TeamState | KeyState | QuotaSignal | Snapshot | Budget:
    return _adapter.validate_json(raw)


def message_key(msg: TeamState | KeyState | QuotaSignal | Snapshot | Budget) -> bytes:
    """Kafka key: the entity id, so a compacted topic keeps the latest state of each entity."""
    match msg:
        case TeamState():
            return f"team:{msg.team_id}".encode()
        case KeyState():
            return f"key:{msg.key_id}".encode()
        case QuotaSignal():
            return f"quota:{msg.scope}:{msg.id}".encode()
        case Snapshot():
            return b"snapshot"
        case Budget():
            return ("budget:" + ":".join(msg.slot)).encode()
