"""The meter's view of the usage row (schemas/usage_row.py): column names, Arrow types, and the row builders.

A row is a tuple in `COLUMNS` order: the event's fields (`EVENT_COLUMNS`, the contract's order), then what the
meter adds. Code reads it by name through `AT[name]`, never by a counted position.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import pyarrow as pa

from schemas.events import SCHEMA_VERSION, UsageEvent
from schemas.usage_row import EVENT, METER, ROW, Field

COLUMNS: tuple[str, ...] = tuple(f.name for f in ROW)
EVENT_COLUMNS: tuple[str, ...] = tuple(f.name for f in EVENT)
AT: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}
INGESTED_AT = AT["ingested_at"]
PRICED = AT["priced"]
assert COLUMNS[len(EVENT) :] == tuple(f.name for f in METER)

_TS = pa.timestamp("ms", tz="UTC")
_SIMPLE: dict[str, pa.DataType] = {
    "String": pa.string(), "UUID": pa.string(), "Bool": pa.bool_(), "Float64": pa.float64(),
    "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(), "DateTime64(3, 'UTC')": _TS,
    "Map(String, String)": pa.map_(pa.string(), pa.string()),
}  # fmt: skip


def arrow_type(clickhouse: str) -> pa.DataType:
    """The Arrow type ClickHouse reads into a column of this type (`FORMAT ArrowStream`)."""
    for wrapper in ("Nullable(", "LowCardinality("):
        if clickhouse.startswith(wrapper):
            return arrow_type(clickhouse[len(wrapper) : -1])
    if m := re.fullmatch(r"Decimal\((\d+), (\d+)\)", clickhouse):
        return pa.decimal128(int(m[1]), int(m[2]))
    return _SIMPLE[clickhouse]


TYPES: tuple[pa.DataType, ...] = tuple(arrow_type(f.clickhouse) for f in ROW)
SCHEMA = pa.schema(list(zip(COLUMNS, TYPES, strict=True)))

# What a batch's insert dedup token is made of: the rows' identity and what a second copy could differ in
# (priced is price_version != "", so the version covers it).
IDENTITY = ("event_id", "price_version", "cost_total")

# row_version decides which copy of an event FINAL keeps. A priced copy always beats an unpriced one (the
# re-pricing pass relies on that); among copies of the same pricedness the EARLIEST write wins, so a late
# replay of an already-billed event can never move an invoiced amount, even if the catalog changed since
# (catalog corrections go through `tollway rerate` adjustment rows instead).
PRICED_BIT = 1 << 48
_MS_MASK = PRICED_BIT - 1


def row_version(priced: bool, written_ms: int) -> int:
    return (PRICED_BIT if priced else 0) | (_MS_MASK - written_ms)


# The integer columns, with the most each holds: the contract bounds counts only below, and a value the
# column cannot hold would fail the whole batch's insert on every retry, so such an event is a dead letter.
COLUMN_LIMITS: tuple[tuple[int, int], ...] = tuple(
    (AT[f.name], f.column_max) for f in EVENT if f.base_type is int and f.column_max is not None
)
LIMITS_TEXT = ", ".join(f"{f.name} {f.clickhouse}" for f in EVENT if f.base_type is int and f.column_max)


def over_column(row: tuple) -> bool:
    for i, most in COLUMN_LIMITS:
        v = row[i]
        if v > most or v < 0:
            return True
    return False


# --- event fields from a decoded JSON object, without building a model ------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MISSING: Any = object()  # a required field's "default": fails every type check


def _default(f: Field) -> Any:
    return _MISSING if f.required else f.default_value()


def _kind(f: Field) -> str:
    t = f.base_type
    if f.name == "schema_version":
        return "version"
    if f.name == "event_id":
        return "uuid"
    if f.choices is not None:
        return "enum"
    return {str: "str", int: "int", bool: "bool", float: "float", datetime: "time"}.get(t, "map")


_PLAN = [(f.name, _default(f), _kind(f), f) for f in EVENT]
_STRS = [(n, d, f.min_length or 0, f.max_length or 2**62) for n, d, k, f in _PLAN if k == "str" and not f.nullable]
_OPT_STRS = [(n, d, f.max_length or 2**62) for n, d, k, f in _PLAN if k == "str" and f.nullable]
_ENUMS = [(n, d, frozenset(f.choices or ())) for n, d, k, f in _PLAN if k == "enum"]
_INTS = [(n, d, f.ge if f.ge is not None else -(2**63), f.le if f.le is not None else 2**128)
         for n, d, k, f in _PLAN if k == "int"]  # fmt: skip
_FLAGS = [(n, d) for n, d, k, _ in _PLAN if k == "bool"]
_FLOATS = [(n, d, f.nullable, f.ge if f.ge is not None else float("-inf")) for n, d, k, f in _PLAN if k == "float"]
_MAPS = [(n, d) for n, d, k, _ in _PLAN if k == "map"]
_TIMES = [n for n, _, k, _ in _PLAN if k == "time"]
assert len(_TIMES) == 1 and [n for n, _, k, _ in _PLAN if k == "uuid"] == ["event_id"]
_DEFAULTS = [(n, d) for n, d, _, _ in _PLAN]
_NONE_STORED = [(AT[f.name], f.stored_none) for f in EVENT if f.stored_none is not None]
_FLOAT_AT = [AT[n] for n, *_ in _FLOATS]
_OCCURRED, _VERSION = AT[_TIMES[0]], AT["schema_version"]
_int, _float, _str, _bool, _dict = int, float, str, bool, dict
_fromiso, _uuid_match = datetime.fromisoformat, _UUID.fullmatch


def event_row(d: Any) -> list | None:
    """The hot path: an event as the proxy writes it (or an older proxy, without newer fields; extras are
    ignored), checked against the contract's types and bounds without building a model. Anything unusual
    returns None and goes through pydantic, which has the last word (it may coerce, or reject with a worded
    reason): this only accepts what pydantic would, and gives the row `model_row` would
    (tests/unit/test_meter_fastpath.py)."""
    if type(d) is not _dict or d.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        return None
    get = d.get
    eid = get("event_id")
    if type(eid) is not _str or not _uuid_match(eid):
        return None
    for name, default, lo, hi in _STRS:
        v = get(name, default)
        if type(v) is not _str or not lo <= len(v) <= hi:
            return None
    for name, default, hi in _OPT_STRS:
        v = get(name, default)
        if v is not None and (type(v) is not _str or len(v) > hi):
            return None
    for name, default, allowed in _ENUMS:
        v = get(name, default)
        if type(v) is not _str or v not in allowed:  # a list here would make `in` raise, not refuse
            return None
    for name, default, lo, hi in _INTS:
        v = get(name, default)
        if type(v) is not _int or not lo <= v <= hi:
            return None
    for name, default in _FLAGS:
        if type(get(name, default)) is not _bool:
            return None
    for name, default, nullable, lo in _FLOATS:
        v = get(name, default)
        if v is None and nullable:
            continue
        if (type(v) is not _float and type(v) is not _int) or not v >= lo:
            return None
    for name, default in _MAPS:
        v = get(name, default)
        if type(v) is not _dict:
            return None
        for k, x in v.items():
            if type(k) is not _str or type(x) is not _str:
                return None
    at = get(_TIMES[0])
    if type(at) is not _str:
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
    row = [get(name, default) for name, default in _DEFAULTS]
    row[_OCCURRED] = when
    row[_VERSION] = SCHEMA_VERSION
    for i in _FLOAT_AT:
        if (v := row[i]) is not None:
            row[i] = float(v)
    for i, stored in _NONE_STORED:
        if row[i] is None:
            row[i] = stored
    return row


_fields_of = attrgetter(*EVENT_COLUMNS)


def model_row(e: UsageEvent) -> list:
    """The event's stored fields, from a validated model (the reference path)."""
    row = list(_fields_of(e))
    for i, stored in _NONE_STORED:
        if row[i] is None:
            row[i] = stored
    return row
