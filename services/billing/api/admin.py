"""Admin API: create teams and keys, list them, revoke keys. Each write persists, then publishes.

A key's secret appears in exactly one place: the response to the request that created it. Every write
answers `published` (the proxies have it) and `will_retry`: a change saved while the broker is away is
answered 202 and stays in the control outbox until the broker takes it.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.clock import iso
from schemas.config import Limits
from schemas.control import KeyState, TeamState
from services.billing import metrics
from services.billing.accounts import Accounts
from services.billing.auth import Caller, admin_caller, staff_caller
from services.billing.control import ControlMsg, ControlPublisher

log = structlog.get_logger("tollway.billing")
router = APIRouter(prefix="/v1/admin", tags=["admin"])

# Bidirectional overrides and isolates reorder what a staff view shows (a name could pose as another).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(value: str) -> str:
    """Names land in staff views, logs and CSV invoices: no control characters (Unicode Cc: C0, DEL, C1),
    line or paragraph separators, surrogates or bidirectional controls."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI:
            raise ValueError(f"must not contain control characters (found U+{ord(ch):04X})")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]


class CreateTeam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    plan: str | None = Field(default=None, max_length=100)
    limits: Limits | None = None


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team_id: str = Field(min_length=1, max_length=64)
    name: Name | None = None
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
        "expires_at": iso(key.expires_at) if key.expires_at else None,
        "metadata": key.metadata,
        "revoked": key.revoked,
    }


def _accounts(request: Request) -> Accounts:
    return request.app.state.accounts


async def _publish(request: Request, response: Response, msg: ControlMsg) -> dict[str, bool]:
    """The change is durable already; say whether the proxies have it. If not, it stays in the outbox."""
    publisher: ControlPublisher = request.app.state.publisher
    published = await publisher.publish(msg)
    if not published:
        response.status_code = 202
        log.warning("control_publish_deferred", kind=msg.kind, pending=publisher.pending)
    return {"published": published, "will_retry": not published}


@router.post("/teams", status_code=201)
async def create_team(body: CreateTeam, request: Request, response: Response,
                      _: Caller = Depends(admin_caller)) -> dict[str, Any]:  # fmt: skip
    team = await _accounts(request).create_team(body.name, plan=body.plan, limits=body.limits)
    metrics.ADMIN_WRITES.labels(operation="create_team").inc()
    return {**team_view(team), **await _publish(request, response, team)}


@router.get("/teams")
async def list_teams(request: Request, name: str | None = None, _: Caller = Depends(staff_caller)) -> dict[str, Any]:
    teams = [t for t in _accounts(request).teams() if name is None or t.name == name]
    return {"object": "list", "data": [team_view(t) for t in teams]}


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, request: Request, response: Response,
                     _: Caller = Depends(admin_caller)) -> dict[str, Any]:  # fmt: skip
    secret, key = await _accounts(request).create_key(
        body.team_id,
        name=body.name,
        plan=body.plan,
        expires_at=body.expires_at,
        limits=body.limits,
        metadata=body.metadata,
    )
    metrics.ADMIN_WRITES.labels(operation="create_key").inc()
    view = key_view(key)
    del view["revoked"]
    return {"key": secret, **view, **await _publish(request, response, key)}


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
async def revoke_key(key_id: str, request: Request, response: Response,
                     _: Caller = Depends(admin_caller)) -> dict[str, Any]:  # fmt: skip
    key = await _accounts(request).revoke_key(key_id)
    metrics.ADMIN_WRITES.labels(operation="revoke_key").inc()
    return {"key_id": key.key_id, "revoked": True, **await _publish(request, response, key)}


class UpdateTeam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = Field(default=None, max_length=100)
    limits: Limits | None = None


class UpdateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    plan: str | None = Field(default=None, max_length=100)
    expires_at: datetime | None = None
    limits: Limits | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=64)


@router.patch("/teams/{team_id}")
async def update_team(
    team_id: str, body: UpdateTeam, request: Request, response: Response, _: Caller = Depends(admin_caller)
) -> dict[str, Any]:
    """Change a team's plan or limits; a raised limit restores an exhausted team right away."""
    team = await _accounts(request).update_team(team_id, plan=body.plan, limits=body.limits)
    metrics.ADMIN_WRITES.labels(operation="update_team").inc()
    published = await _publish(request, response, team)
    await request.app.state.quota.on_account_change(("team", team.team_id))
    return {**team_view(team), **published}


@router.patch("/keys/{key_id}")
async def update_key(
    key_id: str, body: UpdateKey, request: Request, response: Response, _: Caller = Depends(admin_caller)
) -> dict[str, Any]:
    key = await _accounts(request).update_key(key_id, plan=body.plan, limits=body.limits, expires_at=body.expires_at,
                                              metadata=body.metadata, name=body.name)  # fmt: skip
    metrics.ADMIN_WRITES.labels(operation="update_key").inc()
    published = await _publish(request, response, key)
    await request.app.state.quota.on_account_change(("key", key.key_id))
    return {**key_view(key), **published}
