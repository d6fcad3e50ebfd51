"""The store as report endpoints see it: every read carries ClickHouse's own limits, so one caller's report
cannot hold the engine (shared with the meter in embedded mode, where it runs on one thread) for long.

A report past its budget is a 503 that says so, never a 500: the engine may simply be busy.
"""

from __future__ import annotations

from typing import Any

from schemas.clickhouse import Store
from services.billing.errors import GatewayError
from services.billing.settings import BillingSettings

# ClickHouse error names that mean "stopped by a limit we set", not "broken".
_BUDGET_ERRORS = ("TIMEOUT_EXCEEDED", "MEMORY_LIMIT_EXCEEDED", "TOO_MANY_ROWS", "TOO_MANY_BYTES")


class ReportBudgetExceeded(GatewayError):
    status = 503
    type = "api_error"
    code = "report_budget_exceeded"


def report_settings(settings: BillingSettings) -> dict[str, Any]:
    return {
        "max_execution_time": settings.report_max_execution_s,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": settings.report_max_memory_bytes,
        "max_threads": settings.report_max_threads,
    }


class ReportStore:
    """Reads with the report budget; everything else (inserts, commands, `db`) passes straight through."""

    def __init__(self, store: Store, settings: BillingSettings) -> None:
        self._store = store
        self._settings = report_settings(settings)
        self._budget_s = settings.report_max_execution_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        try:
            return await self._store.query(sql, parameters, settings=self._settings)
        except Exception as err:
            if any(name in str(err) for name in _BUDGET_ERRORS):
                raise self._exceeded() from None
            raise

    async def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            return await self._store.query_dicts(sql, parameters, settings=self._settings)
        except Exception as err:
            if any(name in str(err) for name in _BUDGET_ERRORS):
                raise self._exceeded() from None
            raise

    def _exceeded(self) -> ReportBudgetExceeded:
        return ReportBudgetExceeded(
            f"the report needs more than its budget ({self._budget_s:g} s of engine time per query); "
            "narrow the period or the grouping, or try again later"
        )
