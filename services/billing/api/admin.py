"""Admin API: create teams and keys, list them, revoke keys. Each write persists, then publishes.

A key's secret appears in exactly one place: the response to the request that created it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from schemas.config import Limits
from schemas.control import KeyState, TeamState
from services.billing import metrics
from services.billing.accounts import Accounts
from services.billing.auth import Caller, admin_caller, staff_caller
from services.billing.control import ControlMsg, ControlPublisher
from services.billing.errors import ControlUnavailable

log = structlog.get_logger("tollway.billing")
router = APIRouter(prefix="/v1/admin", tags=["admin"])


class CreateTeam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    plan: str | None = Field(default=None, max_length=100)
    limits: Limits | None = None


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team_id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    plan: str | None = Field(default=None, max_length=100)
    expires_at: datetime | None = None
    limits: Limits | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)


def team_view(team: TeamState) -> dict[str, Any]:
    return {
        "team_id": team.team_id,
        "name": team.name,
        "plan": team.plan,
        "limits": team.limits.model_dump(mode="json", exclude_none=True),
    }


def key_view(key: KeyState) -> dict[str, Any]:
    """A key as admins see it: never the secret, never the hash."""
    return {
        "key_id": key.key_id,
        "team_id": key.team_id,
        "prefix": key.prefix,
        "name": key.name,
        "plan": key.plan,
        "limits": key.limits.model_dump(mode="json", exclude_none=True),
        "expires_at": key.expires_at.isoformat().replace("+00:00", "Z") if key.expires_at else None,
        "metadata": key.metadata,
        "revoked": key.revoked,
    }


def _accounts(request: Request) -> Accounts:
    return request.app.state.accounts


async def _publish(request: Request, msg: ControlMsg) -> None:
    publisher: ControlPublisher = request.app.state.publisher
    try:
        await publisher.publish(msg)
    except Exception as e:
        # The change is already durable; the next billing start republishes the full state.
        log.error("control_publish_failed", kind=msg.kind, error=type(e).__name__)
        raise ControlUnavailable(
            "the change is saved but could not be published to the proxies yet; "
            "it will be published when billing next starts"
        ) from None


@router.post("/teams", status_code=201)
async def create_team(body: CreateTeam, request: Request, _: Caller = Depends(admin_caller)) -> dict[str, Any]:
    team = await _accounts(request).create_team(body.name, plan=body.plan, limits=body.limits)
    metrics.ADMIN_WRITES.labels(operation="create_team").inc()
    await _publish(request, team)
    return team_view(team)


@router.get("/teams")
async def list_teams(request: Request, name: str | None = None, _: Caller = Depends(staff_caller)) -> dict[str, Any]:
    teams = [t for t in _accounts(request).teams() if name is None or t.name == name]
    return {"object": "list", "data": [team_view(t) for t in teams]}


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, request: Request, _: Caller = Depends(admin_caller)) -> dict[str, Any]:
    secret, key = await _accounts(request).create_key(
        body.team_id,
        name=body.name,
        plan=body.plan,
        expires_at=body.expires_at,
        limits=body.limits,
        metadata=body.metadata,
    )
    metrics.ADMIN_WRITES.labels(operation="create_key").inc()
    await _publish(request, key)
    view = key_view(key)
    del view["revoked"]
    return {"key": secret, **view}


@router.get("/keys")
async def list_keys(request: Request, team: str | None = None, _: Caller = Depends(staff_caller)) -> dict[str, Any]:
    accounts = _accounts(request)
    team_id = None
    if team is not None:
        found = accounts.find_team(team)
        # An unknown team has no keys; an empty list is the honest answer to the filter.
        team_id = found.team_id if found is not None else team
    return {"object": "list", "data": [key_view(k) for k in accounts.keys(team_id)]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, _: Caller = Depends(admin_caller)) -> dict[str, Any]:
    key = await _accounts(request).revoke_key(key_id)
    metrics.ADMIN_WRITES.labels(operation="revoke_key").inc()
    await _publish(request, key)
    return {"key_id": key.key_id, "revoked": True}


class UpdateTeam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = Field(default=None, max_length=100)
    limits: Limits | None = None


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    plan: str | None = Field(default=None, max_length=100)
    expires_at: datetime | None = None
    limits: Limits | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=64)


@router.patch("/teams/{team_id}")
async def update_team(
    team_id: str, body: UpdateTeam, request: Request, _: Caller = Depends(admin_caller)
) -> dict[str, Any]:
    """Change a team's plan or limits; a raised limit restores an exhausted team right away."""
    team = await _accounts(request).update_team(team_id, plan=body.plan, limits=body.limits)
    metrics.ADMIN_WRITES.labels(operation="update_team").inc()
    await _publish(request, team)
    await request.app.state.quota.on_account_change(("team", team.team_id))
    return team_view(team)


@router.patch("/keys/{key_id}")
async def update_key(
    key_id: str, body: UpdateKey, request: Request, _: Caller = Depends(admin_caller)
) -> dict[str, Any]:
    key = await _accounts(request).update_key(key_id, plan=body.plan, limits=body.limits, expires_at=body.expires_at,
                                              metadata=body.metadata, name=body.name)  # fmt: skip
    metrics.ADMIN_WRITES.labels(operation="update_key").inc()
    await _publish(request, key)
    await request.app.state.quota.on_account_change(("key", key.key_id))
    return key_view(key)
