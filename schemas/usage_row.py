"""The usage row, written down once: every field of a UsageEvent and every column the meter stores beside it.

From this table come the pydantic `UsageEvent` (schemas/events.py, and so the proxy's canonical JSON, whose
field order is the model's, and the JSON Schema export), the meter's columns, its checks, its row builders
and its Arrow schema (services/meter/row.py). tests/integration/test_usage_row_ddl.py holds it against the
real `usage_events` table (`DESCRIBE TABLE` after every migration).

Adding a usage field (add, never repurpose; names are the contract):
1. append a `Field` to `EVENT` below: optional, with a default, so an older proxy's events stay valid and
   `schema_version` stays 1 (a required field would be a v2);
2. add a migration `schemas/clickhouse/NNN_<what>.sql` with `ALTER TABLE {db}.usage_events ADD COLUMN IF NOT
   EXISTS <name> <clickhouse type>` (idempotent: a rerun changes nothing);
3. fill it where the proxy learns it, then `make schemas` (the JSON Schema files follow the model).
Nothing else lists the fields: the meter's fast paths, Arrow schema and inserts follow this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, get_args, get_origin

SCHEMA_VERSION = 1
Status = Literal["ok", "error", "cached", "rejected"]
UsageSource = Literal["provider", "estimated"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    py: Any  # the Python type (a pydantic annotation for event fields)
    clickhouse: str  # the usage_events column type
    meaning: str
    default: Any = REQUIRED
    factory: Callable[[], Any] | None = None  # a mutable default (metadata's {})
    min_length: int | None = None
    max_length: int | None = None
    ge: int | float | None = None
    le: int | float | None = None
    # What a None is stored as: optional strings live in plain String columns, so None is stored as "".
    stored_none: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and self.factory is None

    def default_value(self) -> Any:
        return self.factory() if self.factory is not None else self.default

    @property
    def base_type(self) -> Any:
        """The type without `| None`."""
        args = [a for a in get_args(self.py) if a is not type(None)]
        return args[0] if get_origin(self.py) is not Literal and len(args) == 1 else self.py

    @property
    def nullable(self) -> bool:
        return type(None) in get_args(self.py)

    @property
    def choices(self) -> tuple[str, ...] | None:
        return get_args(self.py) if get_origin(self.py) is Literal else None

    @property
    def column_max(self) -> int | None:
        """The largest integer the column holds (UInt16 -> 65535), None for other columns."""
        t = self.clickhouse
        return 2 ** int(t[4:]) - 1 if t.startswith("UInt") else None


_COUNT = dict(default=0, ge=0)

# Every UsageEvent v1 field, in the contract's canonical order (the proxy's JSON, `model_dump`).
# fmt: off
EVENT: tuple[Field, ...] = (
    Field("schema_version", int, "UInt16", "contract version of this event", default=SCHEMA_VERSION),
    Field("event_id", str, "UUID", "UUIDv7, idempotency key end to end", min_length=32, max_length=36),
    Field("occurred_at", datetime, "DateTime64(3, 'UTC')", "UTC, millisecond precision"),
    Field("request_id", str, "String", "the proxy's id of the HTTP request", max_length=200),
    Field("team_id", str, "LowCardinality(String)", "the team billed", min_length=1, max_length=64),
    Field("key_id", str, "LowCardinality(String)", "the API key used (its id, never the secret)", max_length=64),
    Field(
        "end_user", str | None, "String", "the caller's end-user tag", default=None, max_length=256, stored_none=""
    ),
    Field(
        "metadata", dict[str, str], "Map(String, String)", "string tags from the caller (e.g. project)", factory=dict
    ),
    Field("endpoint", str, "LowCardinality(String)", "the API path called", max_length=64),
    Field("requested_model", str, "LowCardinality(String)", "the model the caller asked for", max_length=256),
    Field(
        "served_model",
        str,
        "LowCardinality(String)",
        "the model that answered ('' if none)",
        default="",
        max_length=256,
    ),
    Field("provider", str, "LowCardinality(String)", "the provider that answered", default="", max_length=128),
    Field("stream", bool, "Bool", "a streamed call", default=False),
    Field("status", Status, "LowCardinality(String)", "ok | error | cached | rejected"),
    Field("http_status", int, "UInt16", "status code answered to the caller", ge=0, le=999),
    Field(
        "error_code",
        str | None,
        "LowCardinality(String)",
        "OpenAI-style error code of a failed call",
        default=None,
        max_length=128,
        stored_none="",
    ),
    Field("prompt_tokens", int, "UInt64", "input tokens, cached ones included", **_COUNT),
    Field("completion_tokens", int, "UInt64", "output tokens, reasoning ones included", **_COUNT),
    Field(
        "cached_tokens", int, "UInt64", "prompt tokens read from the provider's cache (inside prompt_tokens)", **_COUNT
    ),
    Field("latency_ms", float, "Float64", "time from request to the end of the answer", default=0.0, ge=0),
    Field("ttft_ms", float | None, "Nullable(Float64)", "time to the first token of a stream", default=None, ge=0),
    Field("attempts", int, "UInt16", "upstream attempts made (retries and fallbacks)", **_COUNT),
    Field("fallback_used", bool, "Bool", "answered by a fallback route", default=False),
    Field("cache_hit", bool, "Bool", "answered from the proxy's response cache", default=False),
    Field("client_disconnected", bool, "Bool", "the caller left before the end", default=False),
    Field(
        "proxy_instance", str, "LowCardinality(String)", "the proxy replica that emitted it", default="", max_length=128
    ),
    Field("proxy_seq", int, "UInt64", "per-instance sequence number (a gap is a lost event)", **_COUNT),
    Field(
        "usage_source",
        UsageSource,
        "LowCardinality(String)",
        "provider | estimated (explicit zero stays 0)",
        default="provider",
    ),
    # Added 2026-12 (issue 14, for issue 15): reported, not yet priced (cost still follows prompt, completion
    # and cached tokens). Migration 032_usage_token_details.sql.
    Field(
        "reasoning_tokens",
        int,
        "UInt64",
        "completion tokens spent on reasoning (inside completion_tokens; "
        "OpenAI completion_tokens_details.reasoning_tokens)",
        **_COUNT,
    ),
    Field(
        "cache_write_tokens",
        int,
        "UInt64",
        "prompt tokens written to the provider's cache with the 5-minute "
        "TTL (inside prompt_tokens; Anthropic cache_creation.ephemeral_5m_input_tokens)",
        **_COUNT,
    ),
    Field(
        "cache_write_1h_tokens",
        int,
        "UInt64",
        "prompt tokens written to the provider's cache with the 1-hour "
        "TTL (inside prompt_tokens; Anthropic cache_creation.ephemeral_1h_input_tokens)",
        **_COUNT,
    ),
    Field(
        "service_tier",
        str,
        "LowCardinality(String)",
        "the provider's service tier for the call ('' unknown)",
        default="",
        max_length=64,
    ),
    # Added 2026-12 (issue 15): server-side tool calls the provider bills per request. Migration 033.
    Field(
        "web_search_requests",
        int,
        "UInt32",
        "server-side web searches the provider ran for the call (Anthropic server_tool_use.web_search_requests, "
        "OpenAI web_search_call items)",
        **_COUNT,
    ),
    # Added 2026-12 (issue 16): what the proxy told the caller the call cost (services/proxy/cost.py), beside the
    # meter's truth, and why its route was chosen. Migration 035. The quote is the exact decimal text sent in
    # x-tollway-cost-usd / usage.cost, kept as text: '' means nothing was told (unpriced, failed, a stream
    # without include_usage); the ledger reads it with toDecimal128 (services/billing/usage.py).
    Field(
        "quoted_cost_usd",
        str,
        "String",
        "the provisional USD cost told to the caller, exact decimal text ('' none told)",
        default="",
        max_length=64,
    ),
    Field(
        "quoted_price_version",
        str,
        "LowCardinality(String)",
        "the price version behind quoted_cost_usd ('' none)",
        default="",
        max_length=256,
    ),
    Field(
        "route_reason",
        str,
        "LowCardinality(String)",
        "why the answering route was chosen: weighted | cheapest | fastest | fallback | only_route | cache ('' "
        "no route)",
        default="",
        max_length=32,
    ),
)

# What the meter stores beside the event: price, origin and write bookkeeping.
_UNIT, _COST = "Decimal(38, 12)", "Decimal(38, 18)"
METER: tuple[Field, ...] = (
    Field("priced", bool, "Bool", "a price was in force (or nothing was billable)"),
    Field("price_version", str, "LowCardinality(String)", "the catalog version that priced it ('' held)"),
    # Added 2026-12 (issue 15, migration 034): which rates priced it ('' base, 'long_context', a service tier,
    # or '<tier>+long_context': the tier's own long-context rates).
    Field("price_tier", str, "LowCardinality(String)", "the price's rates that priced it ('' the base rates)"),
    Field("unit_input", Decimal, _UNIT, "USD per 1M input tokens"),
    Field("unit_output", Decimal, _UNIT, "USD per 1M output tokens"),
    Field("unit_cached_input", Decimal, _UNIT, "USD per 1M cached input tokens"),
    Field("unit_cache_write", Decimal, _UNIT, "USD per 1M 5-minute cache write tokens"),
    Field("unit_cache_write_1h", Decimal, _UNIT, "USD per 1M 1-hour cache write tokens"),
    Field("unit_request", Decimal, _UNIT, "USD per billable request"),
    Field("unit_web_search", Decimal, _UNIT, "USD per 1,000 web searches"),
    Field("cost_input", Decimal, _COST, "USD for uncached input"),
    Field("cost_cached_input", Decimal, _COST, "USD for cached input"),
    Field("cost_output", Decimal, _COST, "USD for output"),
    Field("cost_cache_write", Decimal, _COST, "USD for 5-minute cache writes"),
    Field("cost_cache_write_1h", Decimal, _COST, "USD for 1-hour cache writes"),
    Field("cost_request", Decimal, _COST, "USD in request fees"),
    Field("cost_web_search", Decimal, _COST, "USD for web searches"),
    Field("cost_total", Decimal, _COST, "USD in all (the sum of every cost_ column)"),
    Field("kafka_partition", int, "UInt32", "where the meter read it (never an identity)"),
    Field("kafka_offset", int, "UInt64", "where the meter read it (never an identity)"),
    Field("ingested_at", datetime, "DateTime64(3, 'UTC')", "when the insert attempt that stored it ran"),
    Field("row_version", int, "UInt64", "which copy FINAL keeps (services/meter/row.py row_version)"),
)

ROW: tuple[Field, ...] = EVENT + METER
BY_NAME: dict[str, Field] = {f.name: f for f in ROW}
