"""`tollway invoices show|export|finalize`: invoices through the billing API.

Token: TOLLWAY_ADMIN_TOKEN, else TOLLWAY_FINANCE_TOKEN (finance reads every team; finalize needs admin),
else TOLLWAY_API_KEY (a team key: its own team only). `show` prints JSON, `export` prints (or writes) CSV.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from tollway.billing_client import call, client, get_csv, guarded

# Admin reads everything; finance reads every team (finalize needs admin); a team key reads its own team.
TOKENS = ("TOLLWAY_ADMIN_TOKEN", "TOLLWAY_FINANCE_TOKEN", "TOLLWAY_API_KEY")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    inv = subparsers.add_parser("invoices", help="show, export (CSV) and finalize monthly invoices")
    sub = inv.add_subparsers(dest="invoices_command", metavar="{show,export,finalize}", required=True)
    for name, helptext in (("show", "print invoices as JSON"), ("export", "print invoices as CSV")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--team", help="team id or name (default: every team the token may read)")
        p.add_argument("--period", help="YYYY-MM (default: the current month)")
        p.add_argument("--id", help="one invoice by id instead")
        if name == "export":
            p.add_argument("--out", help="write the CSV to this file instead of stdout")
    fin = sub.add_parser(
        "finalize",
        help="close a period once it ended plus the grace, in order per team: invoices "
        "(or credit notes) become immutable and numbered (admin)",
    )
    fin.add_argument("--period", required=True, help="YYYY-MM")
    fin.add_argument("--team", help="only this team (default: every team)")
    return inv


def run(args: argparse.Namespace) -> int:
    def action() -> None:
        with client(*TOKENS) as c:
            match args.invoices_command:
                case "show":
                    print(json.dumps(_fetch(c, args, "application/json"), indent=2))
                case "export":
                    text = _fetch(c, args, "text/csv")
                    if args.out:
                        Path(args.out).write_text(text)
                    else:
                        sys.stdout.write(text)
                case "finalize":
                    body: dict[str, Any] = {"period": args.period} | ({"team": args.team} if args.team else {})
                    print(json.dumps(call(c, "POST", "/v1/admin/invoices/finalize", json=body)["data"], indent=2))

    return guarded("invoices", action)


def _fetch(c: httpx.Client, args: argparse.Namespace, accept: str) -> Any:
    path = f"/v1/invoices/{args.id}" if args.id else "/v1/invoices"
    params = {k: v for k, v in (("team", args.team), ("period", args.period)) if v and not args.id}
    if accept == "text/csv":
        return get_csv(c, path, params)
    out = call(c, "GET", path, params=params)
    return out if args.id else out["data"]
