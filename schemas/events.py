"""UsageEvent v1: one per proxied call, the idempotency unit from proxy to invoice.

Field names are the contract: add fields, never repurpose. `event_id` is a UUIDv7 minted by the proxy.
The fields themselves are listed once, in schemas/usage_row.py; the model is built from that table.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from schemas.usage_row import EVENT, SCHEMA_VERSION, Status, UsageSource

__all__ = ["DLQ_TOPIC", "SCHEMA_VERSION", "USAGE_TOPIC", "Status", "UsageEvent", "UsageSource", "utc_now"]

USAGE_TOPIC = "tollway.usage.v1"
DLQ_TOPIC = "tollway.usage.dlq"


class _UsageEventBase(BaseModel):
    # extra="ignore": a newer proxy may add fields; an older meter must still accept the event.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @field_validator("occurred_at", check_fields=False)
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC)")
        return v.astimezone(UTC)

    @field_validator("event_id", check_fields=False)
    @classmethod
    def _uuid(cls, v: str) -> str:
        return str(uuid.UUID(v))

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Any:
        return cls.model_validate(orjson.loads(raw))


def _pydantic(f: Any) -> tuple[Any, Any]:
    bounds = {k: getattr(f, k) for k in ("min_length", "max_length", "ge", "le") if getattr(f, k) is not None}
    extra = {"description": f.meaning}
    if f.factory is not None:
        return f.py, Field(default_factory=f.factory, **bounds, **extra)
    if f.required:
        return f.py, Field(**bounds, **extra)
    return f.py, Field(default=f.default, **bounds, **extra)


UsageEvent = create_model(  # type: ignore[call-overload]
    "UsageEvent", __base__=_UsageEventBase, __module__=__name__, **{f.name: _pydantic(f) for f in EVENT}
)


def utc_now() -> datetime:
    """Now in UTC, truncated to milliseconds (the contract's precision)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
