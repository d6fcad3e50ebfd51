"""The field table (schemas/usage_row.py) is the usage_events table: every column, its type, nothing more;
and a field added through it (migration 032) is stored by both decode paths and reads as its default on
rows written before it existed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from schemas.clickhouse import _statements, migrations
from schemas.config import load_config
from schemas.prices import PriceBook
from schemas.usage_row import ROW
from services.meter.columnar import decode_and_price_columnar
from services.meter.reference import decode_and_price
from services.meter.row import COLUMNS
from services.meter.writer import UsageWriter
from tests.support.events import make_event

BOOK = PriceBook(load_config("tollway.yaml"))
NEW = ("reasoning_tokens", "cache_write_tokens", "cache_write_1h_tokens", "service_tier")


async def described(store) -> dict[str, str]:
    return {r[0]: r[1] for r in await store.query("DESCRIBE TABLE {db}.usage_events")}


async def test_the_field_table_is_the_usage_events_table(store):
    assert await described(store) == {f.name: f.clickhouse for f in ROW}
    assert set(COLUMNS) == {f.name for f in ROW}


async def test_the_new_fields_migration_is_idempotent(store):
    (sql,) = [sql for n, _, sql in migrations() if n == 32]
    before = await described(store)
    for stmt in _statements(sql.replace("{db}", store.db)):
        await store.command(stmt)  # a second run: nothing changes, nothing fails
    assert await described(store) == before


def records(values: list[bytes]) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic="t", partition=0, offset=i, key=b"k", value=v) for i, v in enumerate(values)]


@pytest.mark.parametrize("decode", [decode_and_price, decode_and_price_columnar])
async def test_the_new_fields_are_stored_by_both_decode_paths(store, unique, decode):
    team = f"team_{unique}"
    filled = make_event(team, completion_tokens=50, reasoning_tokens=30, prompt_tokens=900, cache_write_tokens=400,
                        cache_write_1h_tokens=100, service_tier="priority")  # fmt: skip
    plain = make_event(team)
    batch, dead = decode(records([filled.to_bytes(), plain.to_bytes()]), BOOK)
    assert not dead and batch.rows == 2
    assert await UsageWriter(store).insert(batch, asyncio.Event())
    got = await store.query(f"SELECT event_id, {', '.join(NEW)} FROM {{db}}.usage_events FINAL WHERE team_id = "
                            "{t:String}", {"t": team})  # fmt: skip
    assert {str(r[0]): r[1:] for r in got} == {filled.event_id: (30, 400, 100, "priority"),
                                                plain.event_id: (0, 0, 0, "")}  # fmt: skip


async def test_rows_written_before_the_new_columns_read_as_their_defaults(engine, unique):
    store = engine.scoped(f"t_old_{unique}")
    await store.command("CREATE DATABASE IF NOT EXISTS {db}")
    try:
        for n, _, sql in migrations():
            if n < 32:
                for stmt in _statements(sql.replace("{db}", store.db)):
                    await store.command(stmt)
        await store.command("INSERT INTO {db}.usage_events (event_id, team_id) VALUES (generateUUIDv4(), 'old')")
        await store.migrate()
        assert await described(store) == {f.name: f.clickhouse for f in ROW}
        rows = await store.query(f"SELECT {', '.join(NEW)} FROM {{db}}.usage_events WHERE team_id = 'old'")
        assert rows == [(0, 0, 0, "")]
    finally:
        await store.command("DROP DATABASE IF EXISTS {db}")
