"""A batch's rows as Arrow (row.SCHEMA), and one Arrow IPC stream per insert (`FORMAT ArrowStream`).

clickhouse-connect's column insert converts every Python value in Python (~10 us a row for usage_events);
pyarrow converts whole lists in C and ClickHouse reads Arrow without per-value work, which also runs off
the GIL on the ClickHouse thread. The stored values are exactly those of the column insert: timestamps are
floored to milliseconds, and Decimals keep every digit (a value with more fractional digits than the column
holds is truncated the way clickhouse-connect truncates it: `int(value * 10**scale)`).

Both decode paths hand the writer this one form (batch.PricedBatch holds a pyarrow Table): the columnar
path builds it in Arrow, the per-record reference converts its rows here once, at decode time. A row pyarrow
refuses (a value its column cannot hold, e.g. a unit price beyond Decimal(38, 12)) raises `ArrowEncodeError`;
the reference then makes that row a dead letter with the reason, so the insert itself never fails on a value.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from services.meter.row import INGESTED_AT, SCHEMA, TYPES

FORMAT = "ArrowStream"

_TS = pa.timestamp("ms", tz="UTC")
_WIDE = decimal.Context(prec=100)


class ArrowEncodeError(ValueError):
    """pyarrow would not take a value into its column."""


def _decimal_array(col: Sequence[Any], t: pa.Decimal128Type) -> pa.Array:
    """A Decimal column. Its values repeat (the reference shares one price tail per distinct price input, and
    most dimensions of most calls are 0): each distinct value is converted once and the column taken from
    them, a dict lookup per row instead of pyarrow's Decimal conversion (about 5x less CPU a value)."""
    distinct: dict[Any, int] = {}
    index = [distinct.setdefault(x, len(distinct)) for x in col]  # equal values store alike (2 == 2.00)
    if len(distinct) * 4 > len(col):
        return _decimal_values(col, t)
    return _decimal_values(list(distinct), t).take(pa.array(index, pa.int32()))


def _decimal_values(col: Sequence[Any], t: pa.Decimal128Type) -> pa.Array:
    try:
        return pa.array(col, type=t)
    except pa.ArrowInvalid:
        # More fractional digits than the column: truncate exactly as clickhouse-connect does (int(x * 10**s),
        # in the default context), then hand pyarrow the truncated value.
        mult = 10**t.scale
        return pa.array([decimal.Decimal(int(decimal.Decimal(str(x)) * mult)).scaleb(-t.scale, _WIDE)
                         for x in col], type=t)  # fmt: skip


def table_of(columns: Sequence[Sequence[Any]], rows: int) -> pa.Table:
    """Rows as Python columns (row.COLUMNS order) -> a Table in SCHEMA; `ingested_at` is left null (stamped
    by each insert attempt, `ipc`)."""
    arrays: list[pa.Array] = []
    try:
        for i, (col, t) in enumerate(zip(columns, TYPES, strict=True)):
            if i == INGESTED_AT:
                arrays.append(pa.nulls(rows, _TS))
            elif pa.types.is_decimal(t):
                arrays.append(_decimal_array(col, t))
            else:
                arrays.append(pa.array(col, type=t))
    except (pa.ArrowException, TypeError, ValueError, OverflowError, decimal.DecimalException) as err:
        raise ArrowEncodeError(f"{type(err).__name__}: {err}"[:300]) from err
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def ipc(table: pa.Table, ingested_at: datetime) -> bytes:
    """The table as one ArrowStream body, every row stamped with this attempt's `ingested_at`."""
    stamped = table.set_column(INGESTED_AT, SCHEMA.field(INGESTED_AT), pa.repeat(pa.scalar(ingested_at, _TS),
                                                                                   table.num_rows))  # fmt: skip
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as w:
        w.write_table(stamped)
    return sink.getvalue().to_pybytes()
