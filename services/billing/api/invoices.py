"""Invoices: `GET /v1/invoices?team=&period=`, `GET /v1/invoices/{id}` (JSON, or CSV with `Accept: text/csv`),
with `?breakdown=end_user|tag:<name>` a `breakdown` section splitting the usage amount to the cent
(services/billing/attribution.py), and `POST /v1/admin/invoices/finalize {period, team?}` (409 `period_open` before the period's end plus the
grace, 409 `period_out_of_order` naming the earliest open period). A team key sees only its own team's
invoices; a document is an invoice or, when its total is negative, a credit note (`kind`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from schemas.control import TeamState
from services.billing import attribution
from services.billing.auth import Caller, admin_caller, current_caller, team_scope
from services.billing.errors import TeamNotFound
from services.billing.invoices import Invoices, not_found, to_csv
from services.billing.periods import parse_period

router = APIRouter(tags=["invoices"])


class Finalize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: str = Field(min_length=7, max_length=7)
    team: str | None = Field(default=None, max_length=200)


def wants_csv(request: Request) -> bool:
    return "text/csv" in request.headers.get("accept", "") or request.query_params.get("format") == "csv"


def render(request: Request, invoices: list[dict[str, Any]], body: Any, filename: str) -> Any:
    if wants_csv(request):
        return Response(to_csv(invoices), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{filename}.csv"'})  # fmt: skip
    return body


def _teams(request: Request, team_id: str | None) -> list[TeamState]:
    accounts = request.app.state.accounts
    if team_id is None:
        return accounts.teams()
    team = accounts.find_team(team_id)
    if team is None:
        raise TeamNotFound(f"no team with id {team_id!r}")
    return [team]


@router.get("/v1/invoices")
async def list_invoices(request: Request, team: str | None = None, period: str | None = None,
                        caller: Caller = Depends(current_caller)) -> Any:  # fmt: skip
    team_id = team_scope(caller, team, request.app.state.accounts)
    p = parse_period(period, datetime.now(UTC))
    inv: Invoices = request.app.state.invoices
    data = [await inv.get(t, p) for t in _teams(request, team_id)]
    return render(request, data, {"object": "list", "period": p, "data": data}, f"invoices-{p}")


@router.get("/v1/invoices/{invoice_id}")
async def get_invoice(invoice_id: str, request: Request, breakdown: str | None = None,
                      caller: Caller = Depends(current_caller)) -> Any:  # fmt: skip
    dim = attribution.dimension(breakdown, "breakdown") if breakdown else None
    inv: Invoices = request.app.state.invoices
    accounts = request.app.state.accounts
    found: dict[str, Any] | None = None
    if invoice_id.startswith("draft_"):
        team_id, _, period = invoice_id.removeprefix("draft_").rpartition("_")
        team = accounts.find_team(team_id)
        if team is not None and (caller.role != "team" or caller.team_id == team.team_id):
            found = await inv.get(team, parse_period(period, datetime.now(UTC)))
            if found["invoice_id"] != invoice_id:  # finalized meanwhile: the draft id names nothing now
                found = None
    else:
        found = await inv.by_id(invoice_id)
    # Another team's invoice is "not found", not "forbidden": ids must not leak across teams.
    if found is None or (caller.role == "team" and found["team_id"] != caller.team_id):
        raise not_found(invoice_id)
    if dim is not None:  # a section beside the document (its lines, total and hash are untouched)
        found = {**found, "breakdown": await attribution.breakdown(request.app.state.store, found, dim)}
    return render(request, [found], found, found["number"] or found["invoice_id"])


@router.post("/v1/admin/invoices/finalize")
async def finalize(body: Finalize, request: Request, _: Caller = Depends(admin_caller)) -> dict[str, Any]:
    period = parse_period(body.period, datetime.now(UTC))
    inv: Invoices = request.app.state.invoices
    team_id = None
    if body.team is not None:
        team = request.app.state.accounts.find_team(body.team)
        if team is None:
            raise TeamNotFound(f"no team with id or name {body.team!r}")
        team_id = team.team_id
    teams = _teams(request, team_id)
    if team_id is None:
        done = await inv.finalize_all(teams, period)
    else:
        done = [(teams[0], *await inv.finalize(teams[0], period))]
    out = [{"invoice_id": doc["invoice_id"], "number": doc["number"], "kind": doc.get("kind", "invoice"),
            "team_id": team.team_id, "period": period, "total_usd": doc["total_usd"],
            "content_hash": doc["content_hash"], "created": created} for team, doc, created in done]  # fmt: skip
    return {"object": "list", "period": period, "data": out}
