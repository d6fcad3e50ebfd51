"""`GET /v1/usage`: a team's (or, for staff, any or every team's) usage over a range, optionally grouped."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from services.billing.auth import Caller, current_caller, team_scope
from services.billing.usage import parse_group_by, parse_range, usage_report

router = APIRouter(tags=["usage"])


@router.get("/v1/usage")
async def get_usage(
    request: Request,
    team: str | None = None,
    start: str | None = Query(default=None, alias="from"),
    end: str | None = Query(default=None, alias="to"),
    group_by: str | None = None,
    caller: Caller = Depends(current_caller),
) -> dict[str, Any]:
    team_id = team_scope(caller, team, request.app.state.accounts)
    lo, hi = parse_range(start, end, datetime.now(UTC))
    return await usage_report(
        request.app.state.store, team_id, lo, hi, parse_group_by(group_by), request.app.state.config
    )
