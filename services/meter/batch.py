"""A priced batch: the rows one insert stores, what the commit step commits, and its insert dedup token."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.events import UsageEvent
from schemas.prices import Priced
from services.meter.row import AT, COLUMNS, IDENTITY, model_row

_IDENTITY_AT = tuple(AT[name] for name in IDENTITY)


@dataclass(slots=True)
class PricedBatch:
    columns: list[list[Any]] = field(default_factory=lambda: [[] for _ in COLUMNS])
    rows: int = 0  # all rows: those in `columns` and those in `fast`
    unpriced: int = 0
    # (topic, partition) -> (first offset, last offset): what the commit step commits. Never an identity: a
    # fresh bundled broker restarts its log at offset 0 (dedup_token is named by content instead).
    spans: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # Rows priced by the columnar path (services/meter/columnar.py), already a pyarrow Table in row.SCHEMA.
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
            *model_row(e), priced, unit.version if unit else "",
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
