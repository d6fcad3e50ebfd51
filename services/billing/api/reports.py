"""`GET /v1/reports/roi?team=&period=`: savings against baseline prices (JSON, or CSV with `Accept: text/csv`).
`GET /v1/reports/chargeback?team=&period=&by=end_user|tag:<name>`: the period's invoice usage split by end user
or tag value, as CSV with a TOTAL row equal to the invoice's `usage_usd` (JSON with `format=json`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from services.billing import attribution
from services.billing.auth import Caller, current_caller, team_scope
from services.billing.errors import InvalidRequest
from services.billing.periods import parse_period
from services.billing.roi import roi_csv, roi_report

router = APIRouter(tags=["reports"])


@router.get("/v1/reports/roi")
async def roi(request: Request, team: str | None = None, period: str | None = None,
              caller: Caller = Depends(current_caller)) -> Any:  # fmt: skip
    team_id = team_scope(caller, team, request.app.state.accounts)
    if team_id is None:
        raise InvalidRequest("team: required for the admin and finance tokens")
    p = parse_period(period, datetime.now(UTC))
    report = await roi_report(request.app.state.store, request.app.state.config, team_id, p)
    if "text/csv" in request.headers.get("accept", "") or request.query_params.get("format") == "csv":
        return Response(roi_csv(report), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="roi-{team_id}-{p}.csv"'})  # fmt: skip
    return report


@router.get("/v1/reports/chargeback")
async def chargeback(request: Request, team: str | None = None, period: str | None = None, by: str = "",
                     caller: Caller = Depends(current_caller)) -> Any:  # fmt: skip
    team_id = team_scope(caller, team, request.app.state.accounts)
    if team_id is None:
        raise InvalidRequest("team: required for the admin and finance tokens")
    dim = attribution.dimension(by, "by")
    p = parse_period(period, datetime.now(UTC))
    invoice = await request.app.state.invoices.get(request.app.state.accounts.find_team(team_id), p)
    section = await attribution.breakdown(request.app.state.store, invoice, dim)
    if request.query_params.get("format") == "json":
        return {"object": "chargeback", "team_id": team_id, "period": p, "invoice_id": invoice["invoice_id"],
                "usage_usd": invoice["usage_usd"], **section}  # fmt: skip
    name = f"chargeback-{team_id}-{p}-{by.replace(':', '-')}.csv"
    return Response(attribution.chargeback_csv(invoice, section), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip
