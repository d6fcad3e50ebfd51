"""End-user and tag budgets: billing's store (ClickHouse `budgets`, 037_budgets.sql) and its in-memory index.

Writes persist first, then change memory, like accounts. A stored row billing cannot use any more (out of
today's bounds) is logged, counted and skipped: a start never dies on one bad row.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError

from schemas.budgets import Budget, BudgetIndex
from schemas.clickhouse import Store
from services.billing import metrics
from services.billing.accounts import Accounts
from services.billing.errors import InvalidRequest, NotFound, TeamNotFound

log = structlog.get_logger("tollway.billing.budgets")

COLUMNS = ("team_id", "scope", "tag", "value", "tokens_per_month", "budget_usd_per_month", "daily_alert_usd",
           "deleted", "updated_at", "version")  # fmt: skip
# Explicit budgets a team may hold: each is a quota entity billing counts and every proxy knows. A default
# per end user is one budget however many end users the team has.
MAX_BUDGETS_PER_TEAM = 10_000


class BudgetNotFound(NotFound):
    code = "budget_not_found"


class Budgets:
    def __init__(self, store: Store, accounts: Accounts) -> None:
        self._store = store
        self._accounts = accounts
        self.index = BudgetIndex()
        self._lock = asyncio.Lock()
        self._version = 0

    async def load(self) -> None:
        rows = await self._store.query_dicts(f"SELECT {', '.join(COLUMNS)} FROM {{db}}.budgets FINAL WHERE NOT deleted")
        self.index = BudgetIndex()
        for r in rows:
            try:
                self.index.put(Budget(team_id=r["team_id"], scope=r["scope"], tag=r["tag"] or None,
                                      value=r["value"] or None, tokens_per_month=r["tokens_per_month"],
                                      budget_usd_per_month=r["budget_usd_per_month"],
                                      daily_alert_usd=r["daily_alert_usd"]))  # fmt: skip
            except (ValidationError, ValueError, TypeError) as err:
                metrics.STORED_UNUSABLE.labels(table="budgets", field="row").inc()
                log.error("stored_row_unusable", table="budgets", id=f"{r.get('team_id')}:{r.get('scope')}",
                          reason=str(err)[:200])  # fmt: skip
        log.info("budgets_loaded", budgets=len(self.index))

    def list(self, team_id: str | None = None) -> list[Budget]:
        return sorted((b for b in self.index if team_id is None or b.team_id == team_id), key=lambda b: b.slot)

    async def put(self, budget: Budget) -> Budget:
        team = self._accounts.find_team(budget.team_id)
        if team is None or team.team_id != budget.team_id:
            raise TeamNotFound(f"no team with id {budget.team_id!r}")
        async with self._lock:
            if self.index.find(budget.slot) is None:
                held = sum(1 for b in self.index if b.team_id == budget.team_id)
                if held >= MAX_BUDGETS_PER_TEAM:
                    raise InvalidRequest(f"a team holds at most {MAX_BUDGETS_PER_TEAM} budgets")
            await self._write(budget)
            self.index.put(budget)
        log.info("budget_set", team_id=budget.team_id, scope=budget.scope, tag=budget.tag)
        return budget

    async def delete(self, slot: tuple[str, str, str, str]) -> Budget:
        async with self._lock:
            current = self.index.find(slot)
            if current is None:
                raise BudgetNotFound("no such budget")
            gone = current.model_copy(update={"deleted": True})
            await self._write(gone)
            self.index.put(gone)
        log.info("budget_deleted", team_id=gone.team_id, scope=gone.scope, tag=gone.tag)
        return gone

    async def _write(self, b: Budget) -> None:
        self._version = max(time.time_ns(), self._version + 1)
        row = [b.team_id, b.scope, b.tag or "", b.value or "", b.tokens_per_month, b.budget_usd_per_month,
               b.daily_alert_usd, b.deleted, datetime.now(UTC), self._version]  # fmt: skip
        await self._store.insert_rows("budgets", [row], COLUMNS)
