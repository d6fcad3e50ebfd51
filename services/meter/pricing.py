"""Decode and price a batch of Kafka records into ClickHouse columns (pure: no I/O).

Records that do not decode or validate become dead letters with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas.events import UsageEvent
from schemas.prices import PriceBook, price

COLUMNS = (
    "event_id", "occurred_at", "request_id", "team_id", "key_id", "end_user", "metadata", "endpoint",
    "requested_model", "served_model", "provider", "stream", "status", "http_status", "error_code",
    "prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms", "ttft_ms", "attempts",
    "fallback_used", "cache_hit", "client_disconnected", "proxy_instance", "proxy_seq", "usage_source",
    "schema_version", "priced", "price_version", "unit_input", "unit_output", "unit_cached_input",
    "cost_input", "cost_cached_input", "cost_output", "cost_total", "kafka_partition", "kafka_offset",
    "ingested_at", "row_version",
)  # fmt: skip

_PRICED_BIT = 1 << 48


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class PricedBatch:
    columns: list[list[Any]] = field(default_factory=lambda: [[] for _ in COLUMNS])
    rows: int = 0
    unpriced: int = 0
    # (partition, first offset, last offset) per partition: names the batch for insert dedup.
    spans: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def dedup_token(self) -> str:
        """Same records -> same token, so a retried insert of this batch is dropped by ClickHouse."""
        text = ";".join(f"{t}:{p}:{a}-{b}" for (t, p), (a, b) in sorted(self.spans.items()))
        return hashlib.sha256(text.encode()).hexdigest()


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(event)"
        return f"invalid event: {loc}: {first['msg']}"[:500]
    return f"undecodable: {err}"[:500]


def decode_and_price(records: list[Any], book: PriceBook) -> tuple[PricedBatch, list[DeadLetter]]:
    """`records` are aiokafka ConsumerRecords (anything with topic/partition/offset/key/value)."""
    batch = PricedBatch()
    dead: list[DeadLetter] = []
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    cols = batch.columns
    for r in records:
        span_key = (r.topic, r.partition)
        first, _ = batch.spans.get(span_key, (r.offset, r.offset))
        batch.spans[span_key] = (first, r.offset)
        try:
            if r.value is None:
                raise ValueError("empty message")
            e = UsageEvent.model_validate_json(r.value)
        except (ValidationError, ValueError) as err:
            dead.append(DeadLetter(_reason(err), r.topic, r.partition, r.offset, r.key, r.value))
            continue
        p = price(e, book)
        unit, cost = p.unit, p.cost
        priced = unit is not None
        if not priced:
            batch.unpriced += 1
        values = (
            e.event_id, e.occurred_at, e.request_id, e.team_id, e.key_id, e.end_user or "", e.metadata,
            e.endpoint, e.requested_model, e.served_model, e.provider, e.stream, e.status, e.http_status,
            e.error_code or "", e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.latency_ms,
            e.ttft_ms, e.attempts, e.fallback_used, e.cache_hit, e.client_disconnected, e.proxy_instance,
            e.proxy_seq, e.usage_source, e.schema_version, priced,
            unit.version if unit else "", *( (unit.input, unit.output, unit.cached_input) if unit else (0, 0, 0)),
            cost.input, cost.cached_input, cost.output, cost.total, r.partition, r.offset, now,
            now_ms | (_PRICED_BIT if priced else 0),
        )  # fmt: skip
        for col, v in zip(cols, values, strict=True):
            col.append(v)
        batch.rows += 1
    return batch, dead
