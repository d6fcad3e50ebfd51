"""`tollway keys create|revoke|list`: a thin client of the billing admin API.

Talks to `TOLLWAY_BILLING_URL` (default http://127.0.0.1:8090) with `TOLLWAY_ADMIN_TOKEN`; prints JSON on
stdout; an API error prints its message on stderr and exits 1. The token is read from the environment only,
so it never shows in `ps`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from tollway.billing_client import CliError, Conflict, call, client, guarded


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    keys = subparsers.add_parser("keys", help="create, revoke and list API keys (via the billing API)")
    sub = keys.add_subparsers(dest="keys_command", metavar="{create,revoke,list}", required=True)

    create = sub.add_parser("create", help="create a key; a new team name creates the team")
    create.add_argument("--team", required=True, help="team id or name (an unknown name creates the team)")
    create.add_argument("--plan", help="plan of the key (and of the team, if it is created now)")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--expires-at", help="ISO datetime (UTC) after which the key stops working")
    create.add_argument("--tokens-per-month", type=int, help="monthly token quota of this key")
    create.add_argument("--budget-usd-per-month", help="monthly budget (USD) of this key")

    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")

    listing = sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--team", help="only this team (id or name)")

    keys.set_defaults(func=run)
    return keys


def run(args: argparse.Namespace) -> int:
    def action() -> None:
        with client("TOLLWAY_ADMIN_TOKEN", timeout_s=30.0) as c:
            match args.keys_command:
                case "create":
                    out = _create(c, args.team, args.plan, args.name, _extra(args))
                case "revoke":
                    out = call(c, "DELETE", f"/v1/admin/keys/{args.key_id}")
                case "list":
                    out = call(c, "GET", "/v1/admin/keys", params={"team": args.team} if args.team else None)["data"]
                case other:
                    raise CliError(f"unknown keys command {other!r}")
        print(json.dumps(out, indent=2))

    return guarded("keys", action)


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    """expires_at and limit overrides from the optional flags (absent flags send nothing)."""
    body: dict[str, Any] = {}
    if getattr(args, "expires_at", None):
        body["expires_at"] = args.expires_at
    limits = {k: v for k, v in (("tokens_per_month", getattr(args, "tokens_per_month", None)),
                                ("budget_usd_per_month", getattr(args, "budget_usd_per_month", None))) if v is not None}  # fmt: skip
    if limits:
        body["limits"] = limits
    return body


def _create(
    client: httpx.Client, team: str, plan: str | None, name: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    team_id, created = _ensure_team(client, team, plan)
    body: dict[str, Any] = {"team_id": team_id, **(extra or {})}
    if plan:
        body["plan"] = plan
    if name:
        body["name"] = name
    key = call(client, "POST", "/v1/admin/keys", json=body)
    return {**key, "team_created": created}


def _ensure_team(client: httpx.Client, team: str, plan: str | None) -> tuple[str, bool]:
    """(team id, whether it was created now) for a team id or name."""
    found = _find_team(client, team)
    if found is not None:
        return found, False
    body: dict[str, Any] = {"name": team} | ({"plan": plan} if plan else {})
    try:
        return call(client, "POST", "/v1/admin/teams", json=body)["team_id"], True
    except Conflict:
        # Someone created it between our lookup and our create: use theirs.
        found = _find_team(client, team)
        if found is None:
            raise CliError(f"team {team!r} exists but cannot be found") from None
        return found, False


def _find_team(client: httpx.Client, team: str) -> str | None:
    teams = call(client, "GET", "/v1/admin/teams")["data"]
    match = next((t for t in teams if t["team_id"] == team), None) or next(
        (t for t in teams if t["name"] == team), None
    )
    return match["team_id"] if match else None
