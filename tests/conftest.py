"""Session-wide real engines: one tansu broker process and one embedded ClickHouse (chdb) engine.

chdb allows one engine path per process, so tests isolate themselves by database name instead.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from schemas.clickhouse import Store
from tollway.broker import BundledBroker
from tollway.logs import configure_logging
from tollway.topics import ensure_topics

configure_logging("warning", "console")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BundledBroker]:
    b = BundledBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
async def bootstrap(broker: BundledBroker) -> str:
    await ensure_topics(broker.bootstrap, usage_partitions=4)
    return broker.bootstrap


@pytest.fixture(scope="session")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Store]:
    path: Path = tmp_path_factory.mktemp("clickhouse")
    store = Store(f"chdb://{path}", database="tollway")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def store(engine: Store) -> AsyncIterator[Store]:
    """A fresh, migrated database on the session's engine."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    s = engine.scoped(db)
    await s.migrate()
    yield s
    await s.command(f"DROP DATABASE IF EXISTS {db}")


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]
