"""`GET /v1/reports/roi?team=&period=`: savings against baseline prices (JSON, or CSV with `Accept: text/csv`).
`GET /v1/reports/chargeback?team=&period=&by=end_user|tag:<name>`: the period's invoice usage split by end user
or tag value, as CSV with a TOTAL row equal to the invoice's `usage_usd` (JSON with `format=json`). Staff may
leave `team` out: every team with usage that month, each footing to its own invoice, then an `ALL` row (a cost
centre that spans teams, read in one file)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from schemas.money import usd
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
    accounts = request.app.state.accounts
    team_id = team_scope(caller, team, accounts)
    dim = attribution.dimension(by, "by")
    p = parse_period(period, datetime.now(UTC))
    teams = [accounts.find_team(team_id)] if team_id is not None else accounts.teams()
    parts = []
    for t in teams:
        invoice = await request.app.state.invoices.get(t, p)
        if team_id is None and not any(line["type"] == "usage" for line in invoice["lines"]):
            continue  # the organisation's file lists the teams that spent
        parts.append((invoice, await attribution.breakdown(request.app.state.store, invoice, dim)))
    if request.query_params.get("format") == "json":
        docs = [{"object": "chargeback", "team_id": inv["team_id"], "period": p, "invoice_id": inv["invoice_id"],
                 "usage_usd": inv["usage_usd"], **section} for inv, section in parts]  # fmt: skip
        if team_id is not None:
            return docs[0]
        total = sum((Decimal(d["usage_usd"]) for d in docs), Decimal(0))
        return {"object": "list", "period": p, "by": dim.name, "data": docs, "usage_usd": usd(total)}
    scope = team_id or "all"
    name = f"chargeback-{scope}-{p}-{by.replace(':', '-')}.csv"
    return Response(attribution.chargeback_csv(parts, dim.name, grand_total=team_id is None),
                    media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip
