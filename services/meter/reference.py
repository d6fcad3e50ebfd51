"""The per-record reference decoder: a batch of Kafka records decoded, checked and priced one by one (pure).

The meter runs the columnar path (columnar.py), which hands every record it cannot prove identical to this
one. Records that do not decode or validate become dead letters with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import gc
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.clock import FUTURE_TOLERANCE_S, future_cutoff
from schemas.events import UsageEvent
from schemas.prices import DIMENSIONS, ZERO, PriceBook, Priced, price_of
from services.meter.batch import PricedBatch
from services.meter.dead_letters import DeadLetter
from services.meter.encode import ArrowEncodeError, table_of
from services.meter.row import (
    AT,
    COLUMNS,
    EVENT_COLUMNS,
    LIMITS_TEXT,
    PRICED,
    event_row,
    model_row,
    over_column,
    row_version,
)

_COST_LIMIT = Decimal(10) ** 20  # cost columns are Decimal(38, 18)
_OCCURRED, _SERVED, _REQUESTED, _PROVIDER, _STATUS = (
    AT[n] for n in ("occurred_at", "served_model", "requested_model", "provider", "status")
)
_PROMPT, _COMPLETION, _CACHED, _CW, _CW1H, _WEB, _TIER = (AT[n] for n in (
    "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cache_write_1h_tokens",
    "web_search_requests", "service_tier"))  # fmt: skip
# A row is the event's fields, then this tail (the price), then where it was read and its version.
# The dimensions in the order of their columns (schemas/usage_row.py METER), every one of schemas.prices'.
_UNITS = tuple(c[5:] for c in COLUMNS if c.startswith("unit_"))
_COSTS = tuple(c[5:] for c in COLUMNS if c.startswith("cost_") and c != "cost_total")
assert set(_UNITS) == set(_COSTS) == set(DIMENSIONS)
_TAIL = ("priced", "price_version", "price_tier", *(f"unit_{d}" for d in _UNITS), *(f"cost_{d}" for d in _COSTS),
         "cost_total")  # fmt: skip
assert COLUMNS[len(EVENT_COLUMNS) :] == (*_TAIL, "kafka_partition", "kafka_offset", "ingested_at", "row_version")
_TOTAL = _TAIL.index("cost_total")
_HELD_UNITS = (ZERO,) * len(_UNITS)


def price_tail(p: Priced) -> tuple:
    """A row's price columns (`_TAIL`), for a priced or a held (no price in force) event."""
    unit, cost = p.unit, p.cost
    costs = tuple(getattr(cost, d) for d in _COSTS)
    if unit is None:
        return (False, "", "", *_HELD_UNITS, *costs, cost.total)
    return (True, unit.version, unit.tier, *(getattr(unit, d) for d in _UNITS), *costs, cost.total)


def priced_row(e: UsageEvent, p: Priced, partition: int, offset: int, now: datetime, version: int) -> tuple:
    """The stored row of a validated event and its price (the re-pricing pass builds its rows this way)."""
    return (*model_row(e), *price_tail(p), partition, offset, now, version)


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(event)"
        return f"invalid event: {loc}: {first['msg']}"[:500]
    return f"undecodable: {err}"[:500]


def decode_and_price(records: list[Any], book: PriceBook, future_tolerance_s: float = FUTURE_TOLERANCE_S
                     ) -> tuple[PricedBatch, list[DeadLetter]]:  # fmt: skip
    """`records` are aiokafka ConsumerRecords (anything with topic/partition/offset/key/value)."""
    # A batch allocates ~100k containers (dicts, tuples, lists) that all stay alive until it is written, so
    # the cyclic GC keeps firing and re-walking every live object for nothing: about a quarter of the meter's
    # CPU. Nothing here makes cycles; collection resumes right after (and frees whatever became garbage).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode_and_price(records, book, future_tolerance_s=future_tolerance_s)
    finally:
        if enabled:
            gc.enable()


def _decode_and_price(
    records: list[Any], book: PriceBook, now: datetime | None = None, future_tolerance_s: float = FUTURE_TOLERANCE_S
) -> tuple[PricedBatch, list[DeadLetter]]:
    rows, taken, spans, dead = decode_rows(records, book, now, future_tolerance_s)
    batch = PricedBatch(spans=spans)
    if not rows:
        return batch, dead
    columns = [list(c) for c in zip(*rows, strict=True)]
    try:
        batch.table = table_of(columns, len(rows))
    except ArrowEncodeError:
        # Some row holds a value its column cannot (only an absurd catalog price gets here): find it, make it a
        # dead letter with the reason, store the rest. Per row, so only on this rare path.
        kept = []
        for row, i in zip(rows, taken, strict=True):
            try:
                table_of([[v] for v in row], 1)
                kept.append(row)
            except ArrowEncodeError as err:
                r = records[i]
                dead.append(DeadLetter(f"unstorable event: a value exceeds its column ({err})"[:500], r.topic,
                                       r.partition, r.offset, r.key, r.value))  # fmt: skip
        columns = [list(c) for c in zip(*kept, strict=True)] if kept else [[] for _ in COLUMNS]
        batch.table = table_of(columns, len(kept))
        rows = kept
    batch.unpriced = columns[PRICED].count(False)
    return batch, dead


def decode_rows(
    records: list[Any], book: PriceBook, now: datetime | None = None, future_tolerance_s: float = FUTURE_TOLERANCE_S
) -> tuple[list[tuple], list[int], dict[tuple[str, int], tuple[int, int]], list[DeadLetter]]:
    """(rows as Python tuples in row.COLUMNS order, the record index of each, spans, dead letters)."""
    dead: list[DeadLetter] = []
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    taken: list[int] = []
    now = now or datetime.now(UTC)
    _, future = future_cutoff(now, future_tolerance_s)
    now_ms = int(now.timestamp() * 1000)
    v_priced, v_unpriced = row_version(True, now_ms), row_version(False, now_ms)
    rows: list[tuple] = []
    tails: dict[tuple, tuple] = {}
    loads, validate, fast = orjson.loads, UsageEvent.model_validate_json, event_row
    append, JSONDecodeError = rows.append, orjson.JSONDecodeError
    for n, r in enumerate(records):
        topic, partition, offset, value = r.topic, r.partition, r.offset, r.value
        span_key = (topic, partition)
        span = spans.get(span_key)
        spans[span_key] = (offset, offset) if span is None else (span[0], offset)
        f = None
        try:
            if value is None:
                raise ValueError("empty message")
            try:
                f = fast(loads(value))
            except JSONDecodeError:
                f = None
            if f is None:
                f = model_row(validate(value))
        except (ValidationError, ValueError) as err:
            dead.append(DeadLetter(_reason(err), topic, partition, offset, r.key, value))
            continue
        when = f[_OCCURRED]
        if when >= future:
            dead.append(DeadLetter(f"occurred_at {when.isoformat()} is in the future: more than "
                                   f"{future_tolerance_s:g} s ahead of the meter's clock (held; re-feed it once "
                                   "the proxy's clock is right or the time has come)", topic, partition, offset,
                                   r.key, value, future=True))  # fmt: skip
            continue
        # The contract bounds counts only below; a value the column cannot hold would fail the whole batch's
        # insert on every retry (the meter stuck forever), so it is a dead letter.
        if over_column(f):
            dead.append(DeadLetter(f"invalid event: a count exceeds its column ({LIMITS_TEXT})", topic, partition,
                                   offset, r.key, value))  # fmt: skip
            continue
        # Priced rows share one tail per distinct price input (the same Decimal objects), so the Decimal work
        # is done once per (model, provider, day, status, tokens) in a batch.
        pk = (f[_SERVED] or f[_REQUESTED], f[_PROVIDER], when.date(), f[_STATUS], f[_PROMPT], f[_COMPLETION],
              f[_CACHED], f[_CW], f[_CW1H], f[_WEB], f[_TIER])  # fmt: skip
        tail = tails.get(pk)
        if tail is None:
            tail = tails[pk] = price_tail(price_of(pk[0], pk[1], when, pk[3], pk[4], pk[5], pk[6], book, pk[7],
                                                   pk[8], pk[9], pk[10]))  # fmt: skip
        if tail[_TOTAL] >= _COST_LIMIT:
            # Only an absurd catalog price gets here, but such a cost would fail the batch's insert on every
            # retry (Decimal(38, 18) holds < 10^20): a dead letter with the reason, never a stuck meter.
            dead.append(DeadLetter("unbillable event: its cost at the catalog price exceeds the cost columns "
                                   "(Decimal(38, 18)); check the price", topic, partition, offset, r.key, value))  # fmt: skip
            continue
        append((*f, *tail, partition, offset, now, v_priced if tail[0] else v_unpriced))
        taken.append(n)
    return rows, taken, spans, dead
