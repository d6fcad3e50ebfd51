"""Monthly invoices per team: live drafts, the rules for closing a period, immutable finalized documents.

Lines, rounding, proration and adjustment labels are in `invoice_lines` (pure); storage that two billing
replicas can share is in `invoice_documents`. This module is the lifecycle:

  * a draft is computed live from the ledger (`as_of` a moment: only events ingested by then), the plan
    history and what finalized documents already billed;
  * a period can be finalized once it has ended plus the grace for late events (`invoice_grace_s`,
    TOLLWAY_INVOICE_GRACE_S, default 3600 s); events arriving later still are billed as "late usage"
    adjustment lines on the next invoice, so the grace only trades promptness against adjustment lines;
  * periods finalize in order per team: from the team's first period (the month it was created, or of its
    earliest billable usage if that is earlier) each must be finalized before the next. A period before
    the team existed, with no usage, is not open: it is skipped by an all-teams finalize and gives an empty
    invoice only when asked for by team. A period older than a finalized one can no longer be finalized;
    its usage is carried to the next invoice like any late usage, so nothing is ever stranded;
  * adjustments for every closed period land on the first period after the latest finalized one;
  * a document whose total is negative is a numbered credit note (CN-), else an invoice (TW-); both take
    numbers from one counter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from schemas.clickhouse import Store
from schemas.clock import iso
from schemas.config import GatewayConfig
from schemas.control import TeamState
from schemas.periods import bounds, next_period, period_of
from services.billing import ledger, metrics, plan_history
from services.billing.errors import Conflict, InvalidRequest, NotFound
from services.billing.invoice_documents import Documents, document_id
from services.billing.invoice_lines import (
    NUMBER_PREFIX,
    Items,
    adjustment_lines,
    assemble,
    billed_items,
    content_hash,
    items_of,
    plan_fee_lines,
    to_csv,
    usage_lines,
)

__all__ = ["Invoices", "PeriodOpen", "PeriodOutOfOrder", "content_hash", "not_found", "to_csv"]

log = structlog.get_logger("tollway.billing.invoices")


class PeriodOpen(Conflict):
    code = "period_open"


class PeriodOutOfOrder(Conflict):
    code = "period_out_of_order"


_STATUSES = ", ".join(f"'{s}'" for s in ledger.BILLABLE_STATUSES)
_USAGE_PERIODS_SQL = """
SELECT DISTINCT formatDateTime(occurred_at, '%Y-%m') FROM {{db}}.usage_events
WHERE team_id = {{team:String}} AND status IN ({statuses})
"""


class Invoices:
    def __init__(self, store: Store, config: GatewayConfig, grace_s: float = 3600.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:  # fmt: skip
        self.store = store
        self.config = config
        self.documents = Documents(store)
        self.grace = timedelta(seconds=grace_s)
        self._clock = clock
        # One finalization at a time in this process; other replicas are kept out by `Documents`.
        self._lock = asyncio.Lock()

    # -- reads -------------------------------------------------------------------------------------

    async def items(self, team_id: str, period: str, as_of: datetime) -> tuple[Items, int]:
        """The period's billable items (ledger rows of events ingested by `as_of`) and its unpriced count."""
        tm = await ledger.team_month(self.store, team_id, period, ingested_before=as_of)
        return items_of(tm.lines()), tm.unpriced

    async def usage_periods(self, team_id: str) -> set[str]:
        rows = await self.store.query(_USAGE_PERIODS_SQL.format(statuses=_STATUSES), parameters={"team": team_id})
        return {r[0] for r in rows}

    async def finalized(self, team_id: str) -> dict[str, dict[str, Any]]:
        """period -> finalized document of the team."""
        return await self.documents.for_team(team_id)

    async def by_id(self, invoice_id: str) -> dict[str, Any] | None:
        return await self.documents.by_id(invoice_id)

    async def first_period(self, team_id: str, history: plan_history.TeamHistory | None = None) -> str | None:
        """The team's first open period: its creation month, or its earliest usage's if earlier."""
        history = history or await plan_history.team_history(self.store, team_id)
        candidates = await self.usage_periods(team_id)
        if history.created_at is not None:
            candidates.add(period_of(history.created_at))
        return min(candidates) if candidates else None

    async def draft(self, team: TeamState, period: str, now: datetime | None = None) -> dict[str, Any]:
        """The document as it stands at `now`: usage, plan fee, and adjustments of closed periods."""
        now = now or self._clock()
        fin = await self.finalized(team.team_id)
        items, unpriced = await self.items(team.team_id, period, now)
        adjustments: list[dict[str, Any]] = []
        latest = max(fin, default=None)
        if latest is not None and period == next_period(latest):
            closed = set(fin) | {p for p in await self.usage_periods(team.team_id) if p < latest}
            for c in sorted(closed):
                # Last billed = the latest finalization at or after c: each one brought every closed period up to date.
                last_billed = max(datetime.fromisoformat(d["finalized_at"]) for p, d in fin.items() if p >= c)
                truth, _ = await self.items(team.team_id, c, now)
                known, _ = await self.items(team.team_id, c, last_billed)
                adjustments += adjustment_lines(c, fin.get(c), truth, known, billed_items(c, fin))
        history = await plan_history.team_history(self.store, team.team_id)
        default = team.plan or self.config.default_plan
        spans = plan_history.spans(period, history, default)
        spans = [plan_history.PlanSpan(s.plan or self.config.default_plan, s.start, s.end) for s in spans]
        fees = {name: plan.fee_usd_per_month for name, plan in self.config.plans.items()}
        plan = spans[-1].plan if spans else default
        doc = assemble(team.team_id, team.name, plan, period, usage_lines(items),
                       plan_fee_lines(period, spans, fees), adjustments, unpriced, now)  # fmt: skip
        if latest is not None and period < latest:  # closed without an invoice: billed as late usage there
            doc["carried_to"] = next_period(latest)
        return doc

    async def get(self, team: TeamState, period: str) -> dict[str, Any]:
        """The finalized document of a period if there is one, else the live draft."""
        found = (await self.finalized(team.team_id)).get(period)
        return found if found is not None else await self.draft(team, period)

    # -- closing a period --------------------------------------------------------------------------

    def check_closable(self, period: str, now: datetime) -> None:
        start, end = bounds(period)
        if start > now:
            raise InvalidRequest(f"period: {period} has not started yet")
        opens = end + self.grace
        if now < opens:
            raise PeriodOpen(f"period {period} is still open: it can be finalized from {iso(opens)} (its end plus "
                             f"the {int(self.grace.total_seconds())} s grace for late events, TOLLWAY_INVOICE_GRACE_S)")  # fmt: skip

    async def order_problem(self, team: TeamState, period: str, fin: dict[str, dict[str, Any]]) -> str | None:
        """Why `period` cannot be finalized for the team now (None: it can)."""
        latest = max(fin, default=None)
        if latest is not None and period < latest:
            return (f"period {period} of team {team.team_id} precedes {latest}, which is finalized: its usage is "
                    f"carried to the next invoice ({next_period(latest)}) as late usage")  # fmt: skip
        first = await self.first_period(team.team_id)
        if first is None:
            return None
        earliest_open = max(first, next_period(latest)) if latest is not None else first
        if period > earliest_open:
            return (f"finalize {earliest_open} first: periods finalize in order, and {earliest_open} is the "
                    f"earliest open period of team {team.team_id}")  # fmt: skip
        return None

    async def finalize(self, team: TeamState, period: str) -> tuple[dict[str, Any], bool]:
        """(document, created). Finalizing twice, here or on another replica, returns the stored one unchanged."""
        now = self._clock()
        self.check_closable(period, now)
        async with self._lock:
            fin = await self.finalized(team.team_id)
            if period in fin:
                return fin[period], False
            problem = await self.order_problem(team, period, fin)
            if problem is not None:
                raise PeriodOutOfOrder(problem)
            doc = await self.draft(team, period, now)
            doc["invoice_id"] = document_id(team.team_id, period)
            seq = await self.documents.claim_number(doc["invoice_id"], now)
            doc.update(number=f"{NUMBER_PREFIX[doc['kind']]}-{seq:06d}", status="finalized", finalized_at=iso(now))
            doc["content_hash"] = content_hash(doc)
            stored = await self.documents.write(doc, seq, now)
        created = stored["content_hash"] == doc["content_hash"]
        if created:
            metrics.INVOICES_FINALIZED.inc()
            log.info("invoice_finalized", team_id=team.team_id, period=period, number=stored["number"],
                     kind=stored["kind"], total_usd=stored["total_usd"])  # fmt: skip
        return stored, created

    async def finalize_all(self, teams: list[TeamState], period: str) -> list[tuple[TeamState, dict[str, Any], bool]]:
        """Every team that existed or had usage in `period`. Checked for all first: one team out of order
        finalizes nobody, and the 409 names each such team's earliest open period."""
        self.check_closable(period, self._clock())
        todo, problems = [], []
        for team in teams:
            fin = await self.finalized(team.team_id)
            first = await self.first_period(team.team_id)
            if period not in fin and (first is None or period < first):
                continue  # the team did not exist then and has no usage in it: nothing to invoice
            problem = None if period in fin else await self.order_problem(team, period, fin)
            if problem is not None:
                problems.append(problem)
            todo.append(team)
        if problems:
            more = f" (and {len(problems) - 5} more teams)" if len(problems) > 5 else ""
            raise PeriodOutOfOrder("; ".join(problems[:5]) + more)
        return [(team, *await self.finalize(team, period)) for team in todo]


def not_found(invoice_id: str) -> NotFound:
    return NotFound(f"no invoice with id {invoice_id!r}")
