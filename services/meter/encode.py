"""Serialise a priced batch as one Arrow IPC stream, so ClickHouse parses it natively (`FORMAT ArrowStream`).

clickhouse-connect's column insert converts every Python value in Python (~10 us a row for usage_events);
pyarrow converts whole lists in C and ClickHouse reads Arrow without per-value work, which also runs off
the GIL on the ClickHouse thread. The stored values are exactly those of the column insert: timestamps are
floored to milliseconds, and Decimals keep every digit (a value with more fractional digits than the column
holds is truncated the way clickhouse-connect truncates it: `int(value * 10**scale)`).

Anything pyarrow refuses (a count beyond its column type, an odd value from the pydantic path) raises
`ArrowEncodeError`; the writer then falls back to the column insert, so the outcome never depends on the
encoding.
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
    """pyarrow would not take a value as the column insert would: use the column insert for this batch."""


def _decimal_array(col: Sequence[Any], t: pa.Decimal128Type) -> pa.Array:
    try:
        return pa.array(col, type=t)
    except pa.ArrowInvalid:
        # More fractional digits than the column: truncate exactly as clickhouse-connect does (int(x * 10**s),
        # in the default context), then hand pyarrow the truncated value.
        mult = 10**t.scale
        return pa.array([decimal.Decimal(int(decimal.Decimal(str(x)) * mult)).scaleb(-t.scale, _WIDE)
                         for x in col], type=t)  # fmt: skip


class ArrowBatch:
    """Every column but `ingested_at` converted once; `ipc(now)` adds the per-attempt stamp and serialises.

    `columns` (Python lists, `rows` of them) and `fast` (rows the columnar path already built in SCHEMA) go
    out as record batches of one stream: ClickHouse reads them as one insert."""

    __slots__ = ("_arrays", "_fast", "_rows")

    def __init__(self, columns: Sequence[Sequence[Any]], rows: int, fast: pa.Table | None = None) -> None:
        arrays: list[pa.Array | None] = []
        if rows:
            try:
                for i, (col, t) in enumerate(zip(columns, TYPES, strict=True)):
                    if i == INGESTED_AT:
                        arrays.append(None)
                    elif pa.types.is_decimal(t):
                        arrays.append(_decimal_array(col, t))
                    else:
                        arrays.append(pa.array(col, type=t))
            except (pa.ArrowException, TypeError, ValueError, OverflowError, decimal.DecimalException) as err:
                raise ArrowEncodeError(f"{type(err).__name__}: {err}"[:300]) from err
        self._arrays = arrays
        self._rows = rows
        self._fast = fast if fast is not None and fast.num_rows else None

    def ipc(self, ingested_at: datetime) -> bytes:
        stamp = pa.scalar(ingested_at, type=_TS)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, SCHEMA) as w:
            if self._rows:
                arrays = list(self._arrays)
                arrays[INGESTED_AT] = pa.repeat(stamp, self._rows)
                w.write_batch(pa.record_batch(arrays, schema=SCHEMA))
            if self._fast is not None:
                w.write_table(self._fast.set_column(INGESTED_AT, SCHEMA.field(INGESTED_AT),
                                                    pa.repeat(stamp, self._fast.num_rows)))  # fmt: skip
        return sink.getvalue().to_pybytes()
