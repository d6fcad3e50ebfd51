"""UsageEvent v1: one per proxied call, the idempotency unit from proxy to invoice.

Field names are the contract: add fields, never repurpose. `event_id` is a UUIDv7 minted by the proxy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
USAGE_TOPIC = "tollway.usage.v1"
DLQ_TOPIC = "tollway.usage.dlq"

Status = Literal["ok", "error", "cached", "rejected"]
UsageSource = Literal["provider", "estimated"]


class UsageEvent(BaseModel):
    # extra="ignore": a newer proxy may add fields; an older meter must still accept the event.
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(min_length=32, max_length=36, description="UUIDv7, idempotency key end to end")
    occurred_at: datetime = Field(description="UTC, millisecond precision")
    request_id: str = Field(max_length=200)
    team_id: str = Field(min_length=1, max_length=64)
    key_id: str = Field(max_length=64)
    end_user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] = Field(default_factory=dict)
    endpoint: str = Field(max_length=64)
    requested_model: str = Field(max_length=256)
    served_model: str = Field(default="", max_length=256)
    provider: str = Field(default="", max_length=128)
    stream: bool = False
    status: Status
    http_status: int = Field(ge=0, le=999)
    error_code: str | None = Field(default=None, max_length=128)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    attempts: int = Field(default=0, ge=0)
    fallback_used: bool = False
    cache_hit: bool = False
    client_disconnected: bool = False
    proxy_instance: str = Field(default="", max_length=128)
    proxy_seq: int = Field(default=0, ge=0)
    usage_source: UsageSource = "provider"

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC)")
        return v.astimezone(UTC)

    @field_validator("event_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        import uuid

        return str(uuid.UUID(v))

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> UsageEvent:
        return cls.model_validate(orjson.loads(raw))


def utc_now() -> datetime:
    """Now in UTC, truncated to milliseconds (the contract's precision)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
