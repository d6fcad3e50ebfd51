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


def _check(kind: str, f: Field, v: str, c: str) -> str:
    """The contract check of one field as a Python expression over the variable `v` (constants in `c`)."""
    lo = f.ge if f.ge is not None else f.min_length
    hi = f.le if f.le is not None else f.max_length
    if kind == "version":
        return f"{v} == {SCHEMA_VERSION}"
    if kind in ("uuid", "time"):
        return f"type({v}) is _str"  # the pattern / the parse come after the cheap checks
    if kind == "str":
        bounds = f"{lo} <= len({v}) <= {hi}" if lo else f"len({v}) <= {hi}"
        expr = f"type({v}) is _str and {bounds}"
    elif kind == "enum":
        expr = f"type({v}) is _str and {v} in {c}"  # a list here would make `in` raise: typed first
    elif kind == "int":
        expr = f"type({v}) is _int and {v} >= {lo}" + (f" and {v} <= {hi}" if hi is not None else "")
    elif kind == "float":
        # `_inf`: JSON has no infinity (orjson writes it as null), so a dict holding one must not pass either
        expr = f"(type({v}) is _float or type({v}) is _int) and {lo} <= {v} < _inf"
    elif kind == "bool":
        expr = f"type({v}) is _bool"
    else:
        expr = f"type({v}) is _dict"
    return f"({v} is None or ({expr}))" if f.nullable else f"({expr})"


def _stored(kind: str, f: Field, v: str) -> str:
    if kind == "version":
        return str(SCHEMA_VERSION)
    if kind == "time":
        return "when"
    if kind == "float":
        return f"(None if {v} is None else _float({v}))" if f.nullable else f"_float({v})"
    if f.stored_none is not None:
        return f"({v} if {v} is not None else {f.stored_none!r})"
    return v


def _compile_event_row() -> Any:
    """`event_row`, generated from the field table: one read and one flat check per field, as a hand-written
    check would be (a loop over the table costs about twice the CPU per event; bench/meter_throughput.py)."""
    env: dict[str, Any] = {"_str": str, "_int": int, "_float": float, "_bool": bool, "_dict": dict, "UTC": UTC,
                           "_fromiso": datetime.fromisoformat, "_uuid_match": _UUID.fullmatch, "_inf": float("inf")}  # fmt: skip
    reads, checks, out = [], [], []
    for i, f in enumerate(EVENT):
        kind, v = _kind(f), f"v{i}"
        env[f"d{i}"], env[f"c{i}"] = _default(f), frozenset(f.choices or ())
        reads.append(f"    {v} = get({f.name!r}, d{i})")
        checks.append(_check(kind, f, v, f"c{i}"))
        out.append(_stored(kind, f, v))
    uuid_v = f"v{EVENT_COLUMNS.index('event_id')}"
    maps = [f"v{i}" for i, f in enumerate(EVENT) if _kind(f) == "map"]
    time_v = f"v{next(i for i, f in enumerate(EVENT) if _kind(f) == 'time')}"
    src = "\n".join([
        "def event_row(d):",
        "    if type(d) is not _dict:",
        "        return None",
        "    get = d.get",
        *reads,
        "    if not (" + " and ".join(checks) + f" and _uuid_match({uuid_v})):",
        "        return None",
        *[line for m in maps for line in (f"    for k, x in {m}.items():",
                                          "        if type(k) is not _str or type(x) is not _str:",
                                          "            return None")],
        "    try:",
        f"        when = _fromiso({time_v})",
        "    except ValueError:",
        "        return None",
        "    tz = when.tzinfo",
        "    if tz is None:",
        "        return None",
        "    if tz is not UTC and when.utcoffset():",
        "        when = when.astimezone(UTC)",
        "    return [" + ", ".join(out) + "]",
    ])  # fmt: skip
    exec(compile(src, "<services.meter.row.event_row>", "exec"), env)
    fn = env["event_row"]
    fn.__doc__ = _EVENT_ROW_DOC
    fn.__source__ = src
    return fn


_EVENT_ROW_DOC = """The hot path: an event as the proxy writes it (or an older proxy, without newer fields; extras are
ignored), checked against the contract's types and bounds without building a model. Anything unusual returns
None and goes through pydantic, which has the last word (it may coerce, or reject with a worded reason): this
only accepts what pydantic would, and gives the row `model_row` would (tests/unit/test_meter_fastpath.py)."""
event_row = _compile_event_row()
_NONE_STORED = [(AT[f.name], f.stored_none) for f in EVENT if f.stored_none is not None]


_fields_of = attrgetter(*EVENT_COLUMNS)


def model_row(e: UsageEvent) -> list:
    """The event's stored fields, from a validated model (the reference path)."""
    row = list(_fields_of(e))
    for i, stored in _NONE_STORED:
        if row[i] is None:
            row[i] = stored
    return row
