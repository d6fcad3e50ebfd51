"""Through the real writer into the real engine, the columnar path stores exactly the rows the per-record
reference stores (`usage_events FINAL`), whether the batch goes as Arrow or through the column-insert fallback."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
import pytest

from schemas.config import load_config
from schemas.prices import PriceBook
from services.meter.columnar import decode_and_price_columnar
from services.meter.reference import decode_and_price
from services.meter.row import COLUMNS
from services.meter.writer import TABLE, UsageWriter
from tests.integration.test_meter_arrow_exact import edge_values
from tests.support.events import make_event

BOOK = PriceBook(load_config("tollway.yaml"))
COMPARED = [c for c in COLUMNS if c not in ("ingested_at", "row_version")]


@pytest.fixture
async def twin(engine):
    """A second fresh database on the session's engine: the reference writes there."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    s = engine.scoped(db)
    await s.migrate()
    yield s
    await s.command(f"DROP DATABASE IF EXISTS {db}")


def mixed_values(team: str) -> list[bytes | None]:
    values: list[bytes | None] = [
        make_event(team, prompt_tokens=100 + i, completion_tokens=i, cached_tokens=i % 50,
                   status=("ok", "error", "cached", "rejected")[i % 4],
                   occurred_at=datetime(2026, 11, 22, 23, 59, 59, 999999 - i, tzinfo=UTC)).to_bytes()
        for i in range(300)
    ]  # fmt: skip
    values += edge_values(team)  # unicode, huge counts, offsets, missing fields, extra field, upper-case UUID
    base = orjson.loads(make_event(team).to_bytes())
    values += [
        orjson.dumps({**base, "metadata": {"project": "apollo", "env": "prod"}}),
        orjson.dumps({**base, "occurred_at": "2026-11-22T10:00:00"}),  # naive: a dead letter
        orjson.dumps({**base, "prompt_tokens": 12.0}),  # pydantic takes a whole float
        orjson.dumps({**base, "attempts": 70_000}),  # beyond UInt16: a dead letter
        orjson.dumps(base).replace(b'"latency_ms":0.0', b'"latency_ms":NaN'),
        b"not json",
        None,
    ]
    return values


def records(values: list[bytes | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="t", partition=i % 2, offset=i, key=b"k", value=v) for i, v in enumerate(values)]


async def stored(store) -> list[tuple]:
    cols = ", ".join(COMPARED)
    return await store.query(f"SELECT {cols} FROM {{db}}.{TABLE} FINAL ORDER BY kafka_offset")


async def write_both(store, twin, values: list[bytes | None]) -> tuple[list[tuple], list[tuple]]:
    recs = records(values)
    ref, ref_dead = decode_and_price(recs, BOOK)
    got, got_dead = decode_and_price_columnar(recs, BOOK)
    assert got_dead == ref_dead and got.columnar_rows > 0 and got.reference_rows > 0  # a real mix
    assert await UsageWriter(twin).insert(ref, asyncio.Event())
    assert await UsageWriter(store).insert(got, asyncio.Event())
    return await stored(twin), await stored(store)


async def test_columnar_rows_are_stored_exactly_as_the_reference_rows(store, twin, unique):
    expected, actual = await write_both(store, twin, mixed_values(f"team_{unique}"))
    assert len(actual) == len(expected) > 300
    assert actual == expected
