"""Finalized invoices and credit notes in ClickHouse, safe with several billing replicas on one server.

ClickHouse has no transactions, so nothing here takes a lock another replica would see. Instead:
  * identity: a period's document id is derived from (team, period) (`document_id`), so every replica
    names the same document alike and a retry after a crash finds it;
  * numbers: claiming number n inserts the row (n, document) with insert_deduplication_token
    "invoice-number:n". The server keeps the first insert of a token and drops any later one, so of two
    replicas claiming n only one row lands; each reads n back, and the one that lost claims n+1. The
    document's own claim is looked up after reading the highest number, so a concurrent claim for the same
    document is either seen or collides on the same n: one document, one number, no number skipped;
  * documents: inserted with token "invoice-document:<id>" and read back. The first write is the stored
    one; a replica that lost returns the winner's document (created = False). `version` makes FINAL keep
    the FIRST row too, should a duplicate ever pass the dedup window (1000 inserts, see 031_*.sql).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from schemas.clickhouse import Store

DOC_COLUMNS = ("invoice_id", "kind", "number", "seq", "team_id", "period", "total_usd", "content", "content_hash",
               "finalized_at", "version")  # fmt: skip
_U64_MAX = (1 << 64) - 1


def document_id(team_id: str, period: str) -> str:
    """The id of a team-period's document, the same on every replica (invoice or credit note alike)."""
    return "inv_" + hashlib.sha256(f"invoice-document\0{team_id}\0{period}".encode()).hexdigest()[:24]


def first_wins(at: datetime) -> int:
    """A ReplacingMergeTree version under which the earliest write is the largest."""
    return _U64_MAX - int(at.timestamp() * 1000)


class Documents:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def for_team(self, team_id: str) -> dict[str, dict[str, Any]]:
        """period -> the team's finalized document (the first written, if a period ever had two ids)."""
        rows = await self.store.query(
            "SELECT period, content FROM {db}.invoice_documents FINAL WHERE team_id = {t:String} "
            "ORDER BY period, finalized_at DESC",
            parameters={"t": team_id},
        )
        return {period: orjson.loads(content) for period, content in rows}  # later keys win: the first written

    async def every(self, team_id: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """(team, period) -> finalized document, for every team (or one): what reconcile compares."""
        where, params = ("WHERE team_id = {t:String}", {"t": team_id}) if team_id else ("", {})
        rows = await self.store.query(f"SELECT team_id, period, content FROM {{db}}.invoice_documents FINAL {where} "
                                      "ORDER BY team_id, period, finalized_at DESC", parameters=params)  # fmt: skip
        return {(team, period): orjson.loads(content) for team, period, content in rows}

    async def by_id(self, invoice_id: str) -> dict[str, Any] | None:
        rows = await self.store.query("SELECT content FROM {db}.invoice_documents FINAL WHERE invoice_id = {i:String}",
                                      parameters={"i": invoice_id})  # fmt: skip
        return orjson.loads(rows[0][0]) if rows else None

    async def claim_number(self, invoice_id: str, at: datetime) -> int:
        """The document's number: the one it already holds, else the next free one, claimed."""
        while True:
            top = (await self.store.query("SELECT max(seq) FROM {db}.invoice_numbers"))[0][0] or 0
            held = await self.store.query(
                "SELECT min(seq) FROM {db}.invoice_numbers FINAL WHERE invoice_id = {i:String} HAVING count() > 0",
                parameters={"i": invoice_id},
            )
            if held:
                return int(held[0][0])
            n = int(top) + 1
            await self.store.insert_columns("invoice_numbers", [[n], [invoice_id], [at], [first_wins(at)]],
                                            ("seq", "invoice_id", "claimed_at", "version"),
                                            dedup_token=f"invoice-number:{n}")  # fmt: skip
            owner = await self.store.query("SELECT invoice_id FROM {db}.invoice_numbers FINAL WHERE seq = {n:UInt64}",
                                           parameters={"n": n})  # fmt: skip
            if owner and owner[0][0] == invoice_id:
                return n

    async def write(self, doc: dict[str, Any], seq: int, at: datetime) -> dict[str, Any]:
        """Store `doc` unless its id is already stored; either way, the stored document."""
        row = [doc["invoice_id"], doc["kind"], doc["number"], seq, doc["team_id"], doc["period"],
               Decimal(doc["total_usd"]), orjson.dumps(doc).decode(), doc["content_hash"], at, first_wins(at)]  # fmt: skip
        await self.store.insert_columns("invoice_documents", [[v] for v in row], DOC_COLUMNS,
                                        dedup_token=f"invoice-document:{doc['invoice_id']}")  # fmt: skip
        stored = await self.by_id(doc["invoice_id"])
        if stored is None:
            raise RuntimeError(f"invoice document {doc['invoice_id']} did not read back after its insert")
        return stored
