"""`GET /v1/quota`: limits, used, remaining, reset time, state, burn rate and projected exhaustion, for the
calling key and its team (staff: `?team=` and optionally `?key=`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request

from schemas.config import Limits
from services.billing.auth import Caller, current_caller, team_scope
from services.billing.errors import InvalidRequest, KeyNotFound, PermissionDenied
from services.billing.quota import Entity, quota_view
from services.billing.quota_stream import QuotaService

router = APIRouter(tags=["quota"])


def _view(q: QuotaService, entity: Entity, now: datetime) -> dict[str, Any]:
    state, reason = q.state_of(entity)
    return quota_view(entity, q.book.get(entity), q.limits(entity) or Limits(), q.book.period, now, state, reason)


@router.get("/v1/quota")
async def get_quota(request: Request, team: str | None = None, key: str | None = None,
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
    return {
        "object": "quota",
        "period": q.book.period,
        "team": _view(q, ("team", team_id), now),
        "key": _view(q, ("key", key_id), now) if key_id is not None else None,
    }
