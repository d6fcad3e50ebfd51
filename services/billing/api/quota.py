"""`GET /v1/quota`: limits, used, remaining, reset time, state, burn rate and projected exhaustion, for the
calling key and its team (staff: `?team=` and optionally `?key=`), and for one of the team's budgets:
`?end_user=` (its own budget or the team's per-end-user default) or `?tag=&value=` (a SaaS team asking how
much of a customer's or a project's month is left). `budget` is null when no budget limits that entity."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request

from schemas.budgets import end_user_entity, tag_entity
from schemas.config import Limits
from services.billing.auth import Caller, current_caller, team_scope
from services.billing.errors import InvalidRequest, KeyNotFound, PermissionDenied
from services.billing.quota import Entity, quota_view
from services.billing.quota_stream import QuotaService

router = APIRouter(tags=["quota"])


def _view(q: QuotaService, entity: Entity, now: datetime) -> dict[str, Any]:
    state, reason = q.state_of(entity)
    return quota_view(entity, q.book.get(entity), q.limits(entity) or Limits(), q.book.period, now, state, reason)


def _budget_entity(team_id: str, end_user: str | None, tag: str | None, value: str | None) -> Entity | None:
    if end_user is not None:
        if tag is not None or value is not None:
            raise InvalidRequest("ask for one budget: `end_user`, or `tag` and `value`")
        return ("end_user", end_user_entity(team_id, end_user))
    if tag is None and value is None:
        return None
    if not tag or value is None:
        raise InvalidRequest("a tag budget is named by `tag` and `value`")
    return ("tag", tag_entity(team_id, tag, value))


@router.get("/v1/quota")
async def get_quota(request: Request, team: str | None = None, key: str | None = None,
                    end_user: str | None = None, tag: str | None = None, value: str | None = None,
                    caller: Caller = Depends(current_caller)) -> dict[str, Any]:  # fmt: skip
    q: QuotaService = request.app.state.quota
    accounts = request.app.state.accounts
    team_id = team_scope(caller, team, accounts)
    key_id = caller.key_id if caller.role == "team" and key is None else key
    if team_id is None:
        if key_id is None:
            raise InvalidRequest("team: required for the admin and finance tokens")
        found = accounts.get_key(key_id)
        if found is None:
            raise KeyNotFound(f"no key with id {key_id!r}")
        team_id = found.team_id
    if key_id is not None:
        found = accounts.get_key(key_id)
        if found is None or found.team_id != team_id:
            if caller.role == "team":
                raise PermissionDenied("a team key may only read its own team")
            raise KeyNotFound(f"no key with id {key_id!r} in team {team_id!r}")
    now = datetime.now(UTC)
    out: dict[str, Any] = {
        "object": "quota",
        "period": q.book.period,
        "team": _view(q, ("team", team_id), now),
        "key": _view(q, ("key", key_id), now) if key_id is not None else None,
    }
    budgeted = _budget_entity(team_id, end_user, tag, value)
    if budgeted is not None:
        out["budget"] = _view(q, budgeted, now) if q.budgets.index.get(budgeted) is not None else None
    return out
