"""`tollway budgets set|list|delete`: end-user and tag budgets through the billing admin API (schemas/budgets.py).

Same conventions as `tollway keys`: `TOLLWAY_BILLING_URL`, `TOLLWAY_ADMIN_TOKEN` from the environment, JSON on
stdout, an API error's message on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from tollway.billing_client import CliError, call, client, guarded


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    budgets = subparsers.add_parser("budgets", help="monthly budgets per end user or tag value (via the billing API)")
    sub = budgets.add_subparsers(dest="budgets_command", metavar="{set,list,delete}", required=True)
    for name, text in (("set", "create or replace a budget"), ("delete", "delete a budget")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--team", required=True, help="team id or name")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--end-user", help="one end user (the `user` a call sends)")
        who.add_argument("--default-end-user", action="store_true", help="every end user of the team")
        who.add_argument("--tag", help="one tag value, as NAME=VALUE (e.g. project=apollo)")
        if name == "set":
            p.add_argument("--usd", help="monthly budget in USD")
            p.add_argument("--tokens", type=int, help="monthly token allowance")
            p.add_argument("--daily-alert-usd", help="alert once when a UTC day's spend crosses this")
    listing = sub.add_parser("list", help="list budgets with this month's use")
    listing.add_argument("--team", help="only this team (id or name)")
    budgets.set_defaults(func=run)
    return budgets


def _team_id(c: httpx.Client, team: str) -> str:
    for t in call(c, "GET", "/v1/admin/teams")["data"]:
        if team in (t["team_id"], t["name"]):
            return t["team_id"]
    raise CliError(f"no team {team!r}")


def _target(args: argparse.Namespace) -> dict[str, Any]:
    if args.tag is not None:
        tag, eq, value = args.tag.partition("=")
        if not eq or not tag or not value:
            raise CliError("--tag takes NAME=VALUE")
        return {"scope": "tag", "tag": tag, "value": value}
    return {"scope": "end_user", **({"value": args.end_user} if args.end_user is not None else {})}


def run(args: argparse.Namespace) -> int:
    def action() -> None:
        with client("TOLLWAY_ADMIN_TOKEN", timeout_s=30.0) as c:
            match args.budgets_command:
                case "set":
                    body = {"team_id": _team_id(c, args.team), **_target(args)}
                    for field, value in (("budget_usd_per_month", args.usd), ("tokens_per_month", args.tokens),
                                         ("daily_alert_usd", args.daily_alert_usd)):  # fmt: skip
                        if value is not None:
                            body[field] = value
                    out = call(c, "POST", "/v1/admin/budgets", json=body)
                case "delete":
                    params = {"team_id": _team_id(c, args.team), **_target(args)}
                    out = call(c, "DELETE", "/v1/admin/budgets", params=params)
                case "list":
                    params = {"team": args.team} if args.team else None
                    out = call(c, "GET", "/v1/admin/budgets", params=params)["data"]
                case other:
                    raise CliError(f"unknown budgets command {other!r}")
        print(json.dumps(out, indent=2))

    return guarded("budgets", action)
