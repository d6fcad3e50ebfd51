"""`GET /v1/reconcile?period=YYYY-MM[&team=]`: the reconciliation report (staff only); the logic is in
`services.billing.reconcile`, which `tollway reconcile --direct` runs too."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from services.billing.auth import Caller, staff_caller
from services.billing.periods import parse_period
from services.billing.reconcile import reconcile_report

__all__ = ["reconcile_report", "router"]  # reconcile_report re-exported for existing callers

router = APIRouter(tags=["reconcile"])


@router.get("/v1/reconcile")
async def get_reconcile(request: Request, period: str = Query(...), team: str | None = None,
                        caller: Caller = Depends(staff_caller)) -> dict[str, Any]:  # fmt: skip
    accounts = request.app.state.accounts
    team_id = None
    if team is not None:
        found = accounts.find_team(team)
        team_id = found.team_id if found is not None else team
    teams = {t.team_id: t for t in accounts.teams()}
    p = parse_period(period, datetime.now(UTC))
    return await reconcile_report(request.app.state.store, p, team_id, invoices=request.app.state.invoices, teams=teams)
