"""Control messages on `tollway.control.v1`: billing -> every proxy.

Each proxy replica reads the whole topic from the beginning (no consumer group) and folds the messages
into an in-memory view; billing republishes the full state on start, so the view converges even on an
in-memory broker that lost history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas.config import Limits

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


class QuotaSignal(_Msg):
    kind: Literal["quota"] = "quota"
    scope: Literal["team", "key"]
    id: str
    state: Literal["ok", "exhausted"]
    reason: str | None = None
    period: str | None = None


class Snapshot(_Msg):
    """Marks the end of a full-state republish: a proxy that saw it holds a complete view."""

    kind: Literal["snapshot"] = "snapshot"
    published_at: datetime
    keys: int
    teams: int


ControlMessage = Annotated[TeamState | KeyState | QuotaSignal | Snapshot, Field(discriminator="kind")]
_adapter: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)


def encode(msg: TeamState | KeyState | QuotaSignal | Snapshot) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def decode(raw: bytes) -> TeamState | KeyState | QuotaSignal | Snapshot:
    return _adapter.validate_json(raw)


def message_key(msg: TeamState | KeyState | QuotaSignal | Snapshot) -> bytes:
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
