"""Decode and price a batch of Kafka records into ClickHouse columns (pure: no I/O).

Records that do not decode or validate become dead letters with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.events import UsageEvent
from schemas.prices import PriceBook, Priced, price_of

COLUMNS = (
    "event_id", "occurred_at", "request_id", "team_id", "key_id", "end_user", "metadata", "endpoint",
    "requested_model", "served_model", "provider", "stream", "status", "http_status", "error_code",
    "prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms", "ttft_ms", "attempts",
    "fallback_used", "cache_hit", "client_disconnected", "proxy_instance", "proxy_seq", "usage_source",
    "schema_version", "priced", "price_version", "unit_input", "unit_output", "unit_cached_input",
    "cost_input", "cost_cached_input", "cost_output", "cost_total", "kafka_partition", "kafka_offset",
    "ingested_at", "row_version",
)  # fmt: skip
INGESTED_AT = COLUMNS.index("ingested_at")

DEAD_COLUMNS = ("dead_id", "dead_at", "reason", "topic", "partition", "offset", "team_id", "model", "event_id",
                "key", "value")  # fmt: skip

# row_version decides which copy of an event FINAL keeps. A priced copy always beats an unpriced one (the
# re-pricing pass relies on that); among copies of the same pricedness the EARLIEST write wins, so a late
# replay of an already-billed event can never move an invoiced amount, even if the catalog changed since
# (catalog corrections go through `tollway rerate` adjustment rows instead).
PRICED_BIT = 1 << 48
_MS_MASK = PRICED_BIT - 1


def row_version(priced: bool, written_ms: int) -> int:
    return (PRICED_BIT if priced else 0) | (_MS_MASK - written_ms)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def dead_id(self) -> str:
        h = hashlib.sha256(f"{self.topic}:{self.partition}:{self.offset}:".encode())
        h.update(self.value or b"")
        return h.hexdigest()

    def hints(self) -> tuple[str, str, str]:
        """(team_id, model, event_id) if the bad record still reads as a JSON object, else blanks."""
        try:
            d = orjson.loads(self.value or b"")
        except orjson.JSONDecodeError:
            return "", "", ""
        if not isinstance(d, dict):
            return "", "", ""
        pick = lambda k: str(d.get(k) or "")[:256]  # noqa: E731
        return pick("team_id"), pick("served_model") or pick("requested_model"), pick("event_id")


@dataclass(slots=True)
class PricedBatch:
    columns: list[list[Any]] = field(default_factory=lambda: [[] for _ in COLUMNS])
    rows: int = 0
    unpriced: int = 0
    # (topic, partition) -> (first offset, last offset): names the batch for insert dedup and the commit.
    spans: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def dedup_token(self) -> str:
        """Same records -> same token, so a retried insert of this batch is dropped by ClickHouse."""
        text = ";".join(f"{t}:{p}:{a}-{b}" for (t, p), (a, b) in sorted(self.spans.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, e: UsageEvent, p: Priced, partition: int, offset: int, now: datetime, version: int) -> None:
        unit, cost = p.unit, p.cost
        priced = unit is not None
        if not priced:
            self.unpriced += 1
        values = (
            *model_fields(e), priced, unit.version if unit else "",
            *((unit.input, unit.output, unit.cached_input) if unit else (0, 0, 0)),
            cost.input, cost.cached_input, cost.output, cost.total, partition, offset, now, version,
        )  # fmt: skip
        for col, v in zip(self.columns, values, strict=True):
            col.append(v)
        self.rows += 1


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(event)"
        return f"invalid event: {loc}: {first['msg']}"[:500]
    return f"undecodable: {err}"[:500]


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STATUS = frozenset(("ok", "error", "cached", "rejected"))
_SOURCES = frozenset(("provider", "estimated"))
# (field, min length, max length, default when absent): the contract's string bounds (schemas/events.py).
_STRINGS = (("request_id", 0, 200, None), ("team_id", 1, 64, None), ("key_id", 0, 64, None),
            ("endpoint", 0, 64, None), ("requested_model", 0, 256, None), ("served_model", 0, 256, ""),
            ("provider", 0, 128, ""), ("proxy_instance", 0, 128, ""))  # fmt: skip
_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "attempts", "proxy_seq")
_FLAGS = ("stream", "fallback_used", "cache_hit", "client_disconnected")


def _nonneg_int(v: Any) -> bool:
    return type(v) is int and v >= 0


def fast_fields(d: Any) -> tuple | None:
    """The hot path: an event exactly as the proxy writes it, checked against the contract's types and bounds
    without building a model. Anything unusual returns None and goes through pydantic, which has the last
    word (it may coerce, or reject with a worded reason): the fast path only accepts what pydantic would."""
    if type(d) is not dict or d.get("schema_version", 1) != 1:
        return None
    eid = d.get("event_id")
    if type(eid) is not str or not _UUID.fullmatch(eid):
        return None
    for name, lo, hi, default in _STRINGS:
        v = d.get(name, default)
        if type(v) is not str or not lo <= len(v) <= hi:
            return None
    for name in _COUNTS:
        if not _nonneg_int(d.get(name, 0)):
            return None
    for name in _FLAGS:
        if type(d.get(name, False)) is not bool:
            return None
    at = d.get("occurred_at")
    if type(at) is not str:
        return None
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    if when.utcoffset():
        when = when.astimezone(UTC)
    end_user, error_code, meta = d.get("end_user"), d.get("error_code"), d.get("metadata", {})
    latency, ttft, http = d.get("latency_ms", 0.0), d.get("ttft_ms"), d.get("http_status")
    if not (
        d.get("status") in _STATUS
        and d.get("usage_source", "provider") in _SOURCES
        and type(http) is int and 0 <= http <= 999
        and (end_user is None or (type(end_user) is str and len(end_user) <= 256))
        and (error_code is None or (type(error_code) is str and len(error_code) <= 128))
        and type(latency) in (int, float) and latency >= 0
        and (ttft is None or (type(ttft) in (int, float) and ttft >= 0))
        and type(meta) is dict and all(type(k) is str and type(v) is str for k, v in meta.items())
    ):  # fmt: skip
        return None
    return (
        eid, when, d["request_id"], d["team_id"], d["key_id"], end_user or "", meta, d["endpoint"],
        d["requested_model"], d.get("served_model", ""), d.get("provider", ""), d.get("stream", False), d["status"],
        http, error_code or "", d.get("prompt_tokens", 0), d.get("completion_tokens", 0), d.get("cached_tokens", 0),
        float(latency), None if ttft is None else float(ttft), d.get("attempts", 0), d.get("fallback_used", False),
        d.get("cache_hit", False), d.get("client_disconnected", False), d.get("proxy_instance", ""),
        d.get("proxy_seq", 0), d.get("usage_source", "provider"), 1,
    )  # fmt: skip


def model_fields(e: UsageEvent) -> tuple:
    return (
        e.event_id, e.occurred_at, e.request_id, e.team_id, e.key_id, e.end_user or "", e.metadata, e.endpoint,
        e.requested_model, e.served_model, e.provider, e.stream, e.status, e.http_status, e.error_code or "",
        e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.latency_ms, e.ttft_ms, e.attempts, e.fallback_used,
        e.cache_hit, e.client_disconnected, e.proxy_instance, e.proxy_seq, e.usage_source, e.schema_version,
    )  # fmt: skip


def decode_and_price(records: list[Any], book: PriceBook) -> tuple[PricedBatch, list[DeadLetter]]:
    """`records` are aiokafka ConsumerRecords (anything with topic/partition/offset/key/value)."""
    batch = PricedBatch()
    dead: list[DeadLetter] = []
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    v_priced, v_unpriced = row_version(True, now_ms), row_version(False, now_ms)
    spans = batch.spans
    rows: list[tuple] = []
    prices: dict[tuple, Priced] = {}
    loads, validate = orjson.loads, UsageEvent.model_validate_json
    for r in records:
        span_key = (r.topic, r.partition)
        first, _ = spans.get(span_key, (r.offset, r.offset))
        spans[span_key] = (first, r.offset)
        f = None
        try:
            if r.value is None:
                raise ValueError("empty message")
            try:
                f = fast_fields(loads(r.value))
            except orjson.JSONDecodeError:
                f = None
            if f is None:
                f = model_fields(validate(r.value))
        except (ValidationError, ValueError) as err:
            dead.append(DeadLetter(_reason(err), r.topic, r.partition, r.offset, r.key, r.value))
            continue
        # f: 0 event_id, 1 occurred_at, 8 requested_model, 9 served_model, 10 provider, 12 status, 15-17 tokens
        model = f[9] or f[8]
        pk = (model, f[10], f[1].date(), f[12], f[15], f[16], f[17])
        p = prices.get(pk)
        if p is None:
            p = prices[pk] = price_of(model, f[10], f[1], f[12], f[15], f[16], f[17], book)
        unit, cost = p.unit, p.cost
        if unit is None:
            batch.unpriced += 1
            rows.append((*f, False, "", 0, 0, 0, cost.input, cost.cached_input, cost.output, cost.total,
                         r.partition, r.offset, now, v_unpriced))  # fmt: skip
        else:
            rows.append((*f, True, unit.version, unit.input, unit.output, unit.cached_input, cost.input,
                         cost.cached_input, cost.output, cost.total, r.partition, r.offset, now, v_priced))  # fmt: skip
    if rows:
        batch.columns = [list(c) for c in zip(*rows, strict=True)]
        batch.rows = len(rows)
    return batch, dead


def dead_letter_rows(dead: list[DeadLetter], now: datetime) -> list[list[Any]]:
    rows = []
    for d in dead:
        team, model, event_id = d.hints()
        rows.append([d.dead_id(), now, d.reason, d.topic, d.partition, d.offset, team, model, event_id,
                     (d.key or b"").decode("utf-8", "replace"), (d.value or b"").decode("utf-8", "replace")])  # fmt: skip
    return rows
