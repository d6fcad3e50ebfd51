"""Admin API for end-user and tag budgets (schemas/budgets.py): set, list, delete. Each write persists, then
publishes the budget to the proxies, then has the quota loop judge it (a budget set below what is spent
already bites at once; a deleted one restores its entity)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.budgets import Budget
from schemas.money import plain
from services.billing import metrics
from services.billing.api.admin import _printable, _publish
from services.billing.auth import Caller, admin_caller, staff_caller
from services.billing.budgets import Budgets
from services.billing.errors import InvalidRequest

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class SetBudget(BaseModel):
    """The request body; its bounds and shape rules are Budget's (schemas/budgets.py), checked in `_checked`."""

    model_config = ConfigDict(extra="forbid")

    team_id: str
    scope: str
    tag: str | None = None
    value: str | None = None
    budget_usd_per_month: Decimal | None = None
    tokens_per_month: int | None = Field(default=None, strict=True)  # strict: `true` is not 1 token
    daily_alert_usd: Decimal | None = None


def _budgets(request: Request) -> Budgets:
    return request.app.state.budgets


def _checked(**fields: Any) -> Budget:
    """A budget from caller input, or a 400 naming what is wrong (the shape rules live on Budget)."""
    for name in ("tag", "value"):
        if fields.get(name) is not None:
            try:
                _printable(fields[name])
            except ValueError as err:
                raise InvalidRequest(f"{name}: {err}") from None
    try:
        return Budget(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidRequest(f"{where + ': ' if where else ''}{msg}") from None


def budget_view(b: Budget, request: Request) -> dict[str, Any]:
    quota = request.app.state.quota
    out: dict[str, Any] = {
        "team_id": b.team_id,
        "scope": b.scope,
        "tag": b.tag,
        "value": b.value,
        "default": b.is_default,
        "budget_usd_per_month": None if b.budget_usd_per_month is None else plain(b.budget_usd_per_month),
        "tokens_per_month": b.tokens_per_month,
        "daily_alert_usd": None if b.daily_alert_usd is None else plain(b.daily_alert_usd),
    }
    entity = b.entity()
    if entity is not None:
        usage = quota.book.get(entity)
        out["period"] = quota.book.period
        out["used"] = {"tokens": usage.tokens, "usd": plain(usage.usd)}
        out["state"], out["reason"] = quota.state_of(entity)
    return out


@router.post("/budgets", status_code=201)
async def set_budget(body: SetBudget, request: Request, response: Response,
                     _: Caller = Depends(admin_caller)) -> dict[str, Any]:  # fmt: skip
    """Create or replace the budget of one end user, of every end user (`value` left out: the team's
    default), or of one tag value."""
    budget = await _budgets(request).put(_checked(**body.model_dump()))
    metrics.ADMIN_WRITES.labels(operation="set_budget").inc()
    published = await _publish(request, response, budget)
    await request.app.state.quota.on_budget_change(budget)
    return {**budget_view(budget, request), **published}


@router.get("/budgets")
async def list_budgets(request: Request, team: str | None = None,
                       _: Caller = Depends(staff_caller)) -> dict[str, Any]:  # fmt: skip
    found = request.app.state.accounts.find_team(team) if team is not None else None
    team_id = found.team_id if found is not None else team
    return {"object": "list", "data": [budget_view(b, request) for b in _budgets(request).list(team_id)]}


@router.delete("/budgets")
async def delete_budget(request: Request, response: Response, team_id: str, scope: Literal["end_user", "tag"],
                        tag: str | None = None, value: str | None = None,
                        _: Caller = Depends(admin_caller)) -> dict[str, Any]:  # fmt: skip
    if scope == "tag" and (not tag or not value):
        raise InvalidRequest("a tag budget is named by `tag` and `value`")
    gone = await _budgets(request).delete((team_id, scope, tag or "", value or ""))
    metrics.ADMIN_WRITES.labels(operation="delete_budget").inc()
    published = await _publish(request, response, gone)
    await request.app.state.quota.on_budget_change(gone)
    return {"team_id": gone.team_id, "scope": gone.scope, "tag": gone.tag, "value": gone.value, "deleted": True,
            **published}  # fmt: skip
