"""Decode and price a batch of Kafka records into ClickHouse columns (pure: no I/O).

Records that do not decode or validate become dead letters with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import gc
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic import ValidationError

from schemas.clock import FUTURE_TOLERANCE_S, future_cutoff
from schemas.events import UsageEvent
from schemas.prices import ZERO, PriceBook, Priced, price_of

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
PRICED = COLUMNS.index("priced")
# What a batch's insert dedup token is made of: the rows' identity and what a second copy could differ in
# (priced is price_version != "", so the version covers it).
IDENTITY = ("event_id", "price_version", "cost_total")
_IDENTITY_AT = tuple(COLUMNS.index(name) for name in IDENTITY)

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
    # A valid event held for its occurred_at beyond the tolerance (schemas/clock.py); metric
    # tollway_meter_future_events_total.
    future: bool = False

    def dead_id(self) -> str:
        """Named by its bytes, never by where it was read: the same record dead-lettered again (a replay, a
        fresh broker, an operator's re-feed before the fix) is the same dead letter."""
        return hashlib.sha256(b"tollway-dead-v1\x00" + (self.value or b"")).hexdigest()

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
    rows: int = 0  # all rows: those in `columns` and those in `fast`
    unpriced: int = 0
    # (topic, partition) -> (first offset, last offset): what the commit step commits. Never an identity: a
    # fresh bundled broker restarts its log at offset 0 (dedup_token is named by content instead).
    spans: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # Rows priced by the columnar path (services/meter/columnar.py), already a pyarrow Table in encode.SCHEMA.
    fast: Any = None

    @property
    def column_rows(self) -> int:
        """Rows held as Python lists in `columns`."""
        return self.rows - (self.fast.num_rows if self.fast is not None else 0)

    def all_columns(self) -> list[list[Any]]:
        """Every row as Python lists, for the column insert (the fallback when Arrow refuses a value)."""
        columns = [list(c) for c in self.columns]
        if self.fast is not None:
            for i, (name, col) in enumerate(zip(COLUMNS, self.fast.columns, strict=True)):
                values = col.to_pylist()
                columns[i].extend([dict(m) for m in values] if name == "metadata" else values)
        return columns

    def dedup_token(self) -> str:
        """sha256 of every row's (event_id, price_version, cost_total), in batch order: a retried insert of these
        rows (accepted, then the call failed) carries the same token and ClickHouse drops it; a batch holding
        any other event, or the same event at another price, gets another token. ~3 ms for 50k Arrow rows."""
        h = hashlib.sha256(b"tollway-usage-v1")
        ids, versions, costs = (self.columns[i] for i in _IDENTITY_AT)
        h.update(len(ids).to_bytes(8, "little"))
        h.update("".join(f"{e}\x00{v}\x00{c}\x01" for e, v, c in zip(ids, versions, costs, strict=True)).encode())
        if self.fast is not None:
            h.update(self.fast.num_rows.to_bytes(8, "little"))
            for name in IDENTITY:
                _hash_array(h, self.fast[name].combine_chunks())
        return h.hexdigest()

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


def _hash_array(h: Any, arr: Any) -> None:
    """Feed the values of a non-null Arrow string or fixed-width array (its buffers, no Python object per row)."""
    bufs = arr.buffers()
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
        h.update((offsets - offsets[0]).tobytes())
        h.update(memoryview(bufs[2])[offsets[0] : offsets[-1]])
    else:
        width = arr.type.byte_width
        h.update(memoryview(bufs[1])[arr.offset * width : (arr.offset + len(arr)) * width])


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


def _floor_ms(when: datetime) -> datetime:
    """occurred_at as stored (DateTime64(3)) and as the columnar path reads it: floored to the millisecond, so
    both paths hand ClickHouse the same value whichever insert (Arrow or columns) takes the batch."""
    return when.replace(microsecond=when.microsecond - when.microsecond % 1000)


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
    if when.microsecond % 1000:
        when = _floor_ms(when)
    end_user, error_code, meta = d.get("end_user"), d.get("error_code"), d.get("metadata", {})
    latency, ttft, http = d.get("latency_ms", 0.0), d.get("ttft_ms"), d.get("http_status")
    status, source = d.get("status"), d.get("usage_source", "provider")
    if not (
        type(status) is str and status in _STATUS  # a list here would make `in` raise, not refuse
        and type(source) is str and source in _SOURCES
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


_str, _int, _bool, _float, _dict = str, int, bool, float, dict
_uuid_match = _UUID.fullmatch
_fromiso = datetime.fromisoformat
_U16, _U64 = 2**16 - 1, 2**64 - 1
_COST_LIMIT = Decimal(10) ** 20  # cost columns are Decimal(38, 18)
_N_FIELDS = 28  # every UsageEvent v1 field: what the proxy writes (model_dump of the whole event)


def exact_fields(d: Any) -> tuple | None:
    """`fast_fields` for the common case, an event carrying exactly the 28 v1 fields (no defaults to apply,
    no unknown extras): one indexed read per field and one flat check. Same acceptance as `fast_fields`
    (tests/unit/test_meter_fastpath.py holds them equal); anything else returns None."""
    if type(d) is not _dict or len(d) != _N_FIELDS:
        return None
    try:
        sv, eid, at, rid, team = d["schema_version"], d["event_id"], d["occurred_at"], d["request_id"], d["team_id"]
        key, eu, meta, ep, rm = d["key_id"], d["end_user"], d["metadata"], d["endpoint"], d["requested_model"]
        sm, prov, stream, status, http = d["served_model"], d["provider"], d["stream"], d["status"], d["http_status"]
        ec, pt, ct, cat = d["error_code"], d["prompt_tokens"], d["completion_tokens"], d["cached_tokens"]
        lat, ttft, att, fb, ch = d["latency_ms"], d["ttft_ms"], d["attempts"], d["fallback_used"], d["cache_hit"]
        cd, pi, seq, us = d["client_disconnected"], d["proxy_instance"], d["proxy_seq"], d["usage_source"]
    except KeyError:  # 28 keys but not the 28 fields
        return None
    if not (
        sv == 1 and type(eid) is _str and type(at) is _str
        and type(rid) is _str and len(rid) <= 200 and type(team) is _str and 1 <= len(team) <= 64
        and type(key) is _str and len(key) <= 64 and type(ep) is _str and len(ep) <= 64
        and type(rm) is _str and len(rm) <= 256 and type(sm) is _str and len(sm) <= 256
        and type(prov) is _str and len(prov) <= 128 and type(pi) is _str and len(pi) <= 128
        and type(pt) is _int and pt >= 0 and type(ct) is _int and ct >= 0 and type(cat) is _int and cat >= 0
        and type(att) is _int and att >= 0 and type(seq) is _int and seq >= 0
        and type(stream) is _bool and type(fb) is _bool and type(ch) is _bool and type(cd) is _bool
        and type(status) is _str and status in _STATUS and type(us) is _str and us in _SOURCES and type(http) is _int and 0 <= http <= 999
        and (eu is None or (type(eu) is _str and len(eu) <= 256))
        and (ec is None or (type(ec) is _str and len(ec) <= 128))
        and (type(lat) is _float or type(lat) is _int) and lat >= 0
        and (ttft is None or ((type(ttft) is _float or type(ttft) is _int) and ttft >= 0))
        and type(meta) is _dict and _uuid_match(eid)
    ):  # fmt: skip
        return None
    if meta:
        for k, v in meta.items():
            if type(k) is not _str or type(v) is not _str:
                return None
    try:
        when = _fromiso(at)
    except ValueError:
        return None
    tz = when.tzinfo
    if tz is None:
        return None
    if tz is not UTC and when.utcoffset():
        when = when.astimezone(UTC)
    if when.microsecond % 1000:
        when = _floor_ms(when)
    return (
        eid, when, rid, team, key, eu or "", meta, ep, rm, sm, prov, stream, status, http, ec or "", pt, ct, cat,
        float(lat), None if ttft is None else float(ttft), att, fb, ch, cd, pi, seq, us, 1,
    )  # fmt: skip


def model_fields(e: UsageEvent) -> tuple:
    return (
        e.event_id, _floor_ms(e.occurred_at), e.request_id, e.team_id, e.key_id, e.end_user or "", e.metadata, e.endpoint,
        e.requested_model, e.served_model, e.provider, e.stream, e.status, e.http_status, e.error_code or "",
        e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.latency_ms, e.ttft_ms, e.attempts, e.fallback_used,
        e.cache_hit, e.client_disconnected, e.proxy_instance, e.proxy_seq, e.usage_source, e.schema_version,
    )  # fmt: skip


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
    batch = PricedBatch()
    dead: list[DeadLetter] = []
    now = now or datetime.now(UTC)
    _, future = future_cutoff(now, future_tolerance_s)
    now_ms = int(now.timestamp() * 1000)
    v_priced, v_unpriced = row_version(True, now_ms), row_version(False, now_ms)
    spans = batch.spans
    rows: list[tuple] = []
    tails: dict[tuple, tuple] = {}
    loads, validate, exact, fast = orjson.loads, UsageEvent.model_validate_json, exact_fields, fast_fields
    append, JSONDecodeError = rows.append, orjson.JSONDecodeError
    for r in records:
        topic, partition, offset, value = r.topic, r.partition, r.offset, r.value
        span_key = (topic, partition)
        span = spans.get(span_key)
        spans[span_key] = (offset, offset) if span is None else (span[0], offset)
        f = None
        try:
            if value is None:
                raise ValueError("empty message")
            try:
                d = loads(value)
                f = exact(d) or fast(d)
            except JSONDecodeError:
                f = None
            if f is None:
                f = model_fields(validate(value))
        except (ValidationError, ValueError) as err:
            dead.append(DeadLetter(_reason(err), topic, partition, offset, r.key, value))
            continue
        # f: 0 event_id, 1 occurred_at, 8 requested_model, 9 served_model, 10 provider, 12 status, 15-17 tokens,
        # 20 attempts, 25 proxy_seq. The contract bounds these only below; a value the column cannot hold would
        # fail the whole batch's insert on every retry (the meter stuck forever), so it is a dead letter.
        if f[1] >= future:
            dead.append(DeadLetter(f"occurred_at {f[1].isoformat()} is in the future: more than "
                                   f"{future_tolerance_s:g} s ahead of the meter's clock (held; re-feed it once "
                                   "the proxy's clock is right or the time has come)", topic, partition, offset,
                                   r.key, value, future=True))  # fmt: skip
            continue
        if f[20] > _U16 or f[15] > _U64 or f[16] > _U64 or f[17] > _U64 or f[25] > _U64:
            dead.append(DeadLetter("invalid event: a count exceeds its column (attempts UInt16, tokens and "
                                   "proxy_seq UInt64)", topic, partition, offset, r.key, value))  # fmt: skip
            continue
        # Priced rows share one tail per distinct price input (the same Decimal objects), so the Decimal work
        # is done once per (model, provider, day, status, tokens) in a batch.
        pk = (f[9] or f[8], f[10], f[1].date(), f[12], f[15], f[16], f[17])
        tail = tails.get(pk)
        if tail is None:
            p = price_of(pk[0], pk[1], f[1], pk[3], pk[4], pk[5], pk[6], book)
            unit, cost = p.unit, p.cost
            if unit is None:
                tail = (False, "", ZERO, ZERO, ZERO, cost.input, cost.cached_input, cost.output, cost.total)
            else:
                tail = (True, unit.version, unit.input, unit.output, unit.cached_input, cost.input,
                        cost.cached_input, cost.output, cost.total)  # fmt: skip
            tails[pk] = tail
        if tail[8] >= _COST_LIMIT:
            # Only an absurd catalog price gets here, but such a cost would fail the batch's insert on every
            # retry (Decimal(38, 18) holds < 10^20): a dead letter with the reason, never a stuck meter.
            dead.append(DeadLetter("unbillable event: its cost at the catalog price exceeds the cost columns "
                                   "(Decimal(38, 18)); check the price", topic, partition, offset, r.key, value))  # fmt: skip
            continue
        append((*f, *tail, partition, offset, now, v_priced if tail[0] else v_unpriced))
    if rows:
        batch.columns = [list(c) for c in zip(*rows, strict=True)]
        batch.rows = len(rows)
        batch.unpriced = batch.columns[PRICED].count(False)
    return batch, dead


def dead_letter_rows(dead: list[DeadLetter], now: datetime) -> list[list[Any]]:
    rows = []
    for d in dead:
        team, model, event_id = d.hints()
        rows.append([d.dead_id(), now, d.reason, d.topic, d.partition, d.offset, team, model, event_id,
                     (d.key or b"").decode("utf-8", "replace"), (d.value or b"").decode("utf-8", "replace")])  # fmt: skip
    return rows
