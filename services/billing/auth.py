"""Who is calling: the admin token, the finance token, or a team's API key, and what each may touch.

admin   -> everything;
finance -> reads of every team (usage, teams, keys), no admin writes;
team    -> reads of its own team only.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from services.billing import metrics
from services.billing.accounts import Accounts
from services.billing.errors import InvalidApiKey, PermissionDenied, TeamNotFound
from services.billing.settings import BillingSettings

Role = Literal["admin", "finance", "team"]


@dataclass(frozen=True, slots=True)
class Caller:
    role: Role
    team_id: str | None = None  # set for role "team"
    key_id: str | None = None


def token_from(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def _same(token: str, expected: str | None) -> bool:
    # Constant time; an unset or empty service token never matches anything.
    if not expected:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())


def identify(token: str, settings: BillingSettings, accounts: Accounts) -> Caller | None:
    """The caller a token stands for, or None; counts nothing (admission peeks before the route decides)."""
    if _same(token, settings.admin_token):
        return Caller(role="admin")
    if _same(token, settings.finance_token):
        return Caller(role="finance")
    key = accounts.authenticate(token)
    return None if key is None else Caller(role="team", team_id=key.team_id, key_id=key.key_id)


def resolve(token: str | None, settings: BillingSettings, accounts: Accounts) -> Caller:
    if token is None:
        metrics.AUTH_FAILURES.labels(reason="missing").inc()
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    caller = identify(token, settings, accounts)
    if caller is None:
        metrics.AUTH_FAILURES.labels(reason="invalid").inc()
        raise InvalidApiKey("invalid API key (unknown, revoked or expired)")
    return caller


def require_admin(caller: Caller) -> Caller:
    if caller.role != "admin":
        metrics.AUTH_FAILURES.labels(reason="forbidden").inc()
        raise PermissionDenied("this endpoint needs the admin token")
    return caller


def require_staff(caller: Caller) -> Caller:
    """Admin or finance: cross-team reads."""
    if caller.role not in ("admin", "finance"):
        metrics.AUTH_FAILURES.labels(reason="forbidden").inc()
        raise PermissionDenied("this endpoint needs the admin or finance token")
    return caller


def team_scope(caller: Caller, requested: str | None, accounts: Accounts) -> str | None:
    """The team id a read may cover: a team key is pinned to its own team; staff may pick any (or all)."""
    if caller.role == "team":
        own = accounts.find_team(caller.team_id or "")
        if requested is None or requested == caller.team_id or (own is not None and requested == own.name):
            return caller.team_id
        metrics.AUTH_FAILURES.labels(reason="forbidden").inc()
        raise PermissionDenied("a team key may only read its own team")
    if requested is None:
        return None
    team = accounts.find_team(requested)
    if team is None:
        raise TeamNotFound(f"no team with id or name {requested!r}")
    return team.team_id


# -- FastAPI dependencies ----------------------------------------------------------------------------


def current_caller(request: Request) -> Caller:
    token = token_from(request.headers.get("authorization"), request.headers.get("x-api-key"))
    return resolve(token, request.app.state.settings, request.app.state.accounts)


def admin_caller(request: Request) -> Caller:
    return require_admin(current_caller(request))


def staff_caller(request: Request) -> Caller:
    return require_staff(current_caller(request))
