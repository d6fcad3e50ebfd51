"""A priced batch: the rows one insert stores, what the commit step commits, and its insert dedup token."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.meter.row import IDENTITY, SCHEMA


@dataclass(slots=True)
class PricedBatch:
    """What one insert stores: the rows as one pyarrow Table in row.SCHEMA (from either decode path; the
    per-record reference converts its rows once, encode.table_of), and what the commit after it commits."""

    table: pa.Table = field(default_factory=SCHEMA.empty_table)
    unpriced: int = 0
    # (topic, partition) -> (first offset, last offset): what the commit step commits. Never an identity: a
    # fresh bundled broker restarts its log at offset 0 (dedup_token is named by content instead).
    spans: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    columnar_rows: int = 0  # how many rows the columnar path built (the rest came from the reference)

    @property
    def rows(self) -> int:
        return self.table.num_rows

    @property
    def reference_rows(self) -> int:
        return self.rows - self.columnar_rows

    def joined(self, other: pa.Table) -> None:
        """Append rows built elsewhere (the columnar path's) after these."""
        if other.num_rows:
            self.table = pa.concat_tables([self.table, other]) if self.table.num_rows else other
            self.unpriced += other.num_rows - pc.sum(other["priced"]).as_py()
            self.columnar_rows += other.num_rows

    def dedup_token(self) -> str:
        """sha256 of every row's (event_id, price_version, cost_total), in batch order: a retried insert of these
        rows (accepted, then the call failed) carries the same token and ClickHouse drops it; a batch holding
        any other event, or the same event at another price, gets another token. ~3 ms for 50k rows."""
        h = hashlib.sha256(b"tollway-usage-v2")
        h.update(self.table.num_rows.to_bytes(8, "little"))
        for name in IDENTITY:
            _hash_array(h, self.table[name].combine_chunks())
        return h.hexdigest()


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
