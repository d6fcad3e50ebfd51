"""ClickHouse side of the contract: numbered idempotent migrations, and one async-friendly store handle.

The same code talks to a ClickHouse server (`http(s)://`) or the embedded engine (`chdb://<dir>`), both
through clickhouse-connect. chdb has no async client and allows one engine per process, so every call
runs on one dedicated thread; in embedded mode meter and billing share a single Store.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from schemas.billed import BILLED_MODEL_SQL

MIGRATIONS_TABLE = "schema_migrations"


# Rules the SQL files share with the code, written once (schemas/billed.py) and named in the files as
# `{name}`; `{db}` is the database, filled in when a statement runs.
SQL_RULES = {"{billed_model}": BILLED_MODEL_SQL}


def migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every `NNN_name.sql` shipped in this package, in order, rules filled in."""
    out = []
    for f in resources.files(__name__).iterdir():
        m = re.match(r"^(\d{3})_(\w+)\.sql$", f.name)
        if m:
            sql = f.read_text()
            for name, rule in SQL_RULES.items():
                sql = sql.replace(name, rule)
            out.append((int(m.group(1)), m.group(2), sql))
    return sorted(out)


def _statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def open_client(url: str, database: str = "tollway") -> Any:
    """A clickhouse-connect client for a `chdb://path` or `http(s)://user:pw@host:port` URL."""
    if url.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=url)
    u = urlparse(url)
    return clickhouse_connect.get_client(
        host=u.hostname or "localhost",
        port=u.port or (8443 if u.scheme == "https" else 8123),
        username=u.username or "default",
        password=u.password or "",
        secure=u.scheme == "https",
        autogenerate_session_id=False,
    )


class Store:
    """Async facade over one clickhouse-connect client; calls run on a dedicated thread."""

    def __init__(self, url: str, database: str = "tollway") -> None:
        self.url = url
        self.db = database
        self.embedded = url.startswith("chdb://")
        # chdb: one engine, one thread. A server client is safe with a few concurrent callers.
        self._pool = ThreadPoolExecutor(max_workers=1 if self.embedded else 4, thread_name_prefix="clickhouse")
        self._client: Any = None
        self._owner = True

    def scoped(self, database: str) -> Store:
        """The same engine and thread under another database (tests isolate themselves this way)."""
        view = Store.__new__(Store)
        view.url, view.db, view.embedded = self.url, database, self.embedded
        view._pool, view._client, view._owner = self._pool, self._client, False
        return view

    async def open(self) -> None:
        self._client = await self._run(open_client, self.url, self.db)

    async def close(self) -> None:
        if not self._owner:
            return
        if self._client is not None:
            await self._run(self._client.close)
            self._client = None
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kw))

    async def migrate(self) -> list[int]:
        """Apply every migration not yet recorded; each is idempotent, so a crash mid-way is harmless."""
        return await self._run(self._migrate_sync)

    def _migrate_sync(self) -> list[int]:
        c = self._client
        c.command(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        c.command(
            f"CREATE TABLE IF NOT EXISTS {self.db}.{MIGRATIONS_TABLE} "
            "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {r[0] for r in c.query(f"SELECT version FROM {self.db}.{MIGRATIONS_TABLE}").result_rows}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            for stmt in _statements(sql.replace("{db}", self.db)):
                c.command(stmt)
            c.insert(f"{self.db}.{MIGRATIONS_TABLE}", [[version, name]], column_names=["version", "name"])
            applied.append(version)
        return applied

    async def query(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> list[tuple]:
        """`settings`: per-query ClickHouse settings (e.g. max_execution_time for report reads)."""
        result = await self._run(self._client.query, sql.replace("{db}", self.db), parameters=parameters,
                                 settings=settings)  # fmt: skip
        return result.result_rows

    async def query_dicts(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        result = await self._run(self._client.query, sql.replace("{db}", self.db), parameters=parameters,
                                 settings=settings)  # fmt: skip
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    async def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        return await self._run(self._client.command, sql.replace("{db}", self.db), parameters=parameters)

    async def insert_columns(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        dedup_token: str | None = None,
    ) -> None:
        """Column-oriented insert (one list per column): the cheap path for big batches."""
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
        await self._run(
            self._client.insert,
            f"{self.db}.{table}",
            columns,
            column_names=list(column_names),
            column_oriented=True,
            settings=settings,
        )

    async def insert_raw(
        self,
        table: str,
        data: bytes,
        column_names: Sequence[str],
        fmt: str,
        dedup_token: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Insert bytes already in a ClickHouse input format (e.g. ArrowStream): ClickHouse parses them natively,
        with no per-value conversion in Python. Same dedup token semantics as `insert_columns`; `settings` are
        extra per-insert ClickHouse settings."""
        settings = dict(settings or {})
        if dedup_token:
            settings["insert_deduplication_token"] = dedup_token
        await self._run(
            self._client.raw_insert,
            f"{self.db}.{table}",
            list(column_names),
            insert_block=data,
            settings=settings or None,
            fmt=fmt,
        )

    async def insert_rows(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str]) -> None:
        await self._run(self._client.insert, f"{self.db}.{table}", rows, column_names=list(column_names))
