"""`tollway report roi --team T [--period YYYY-MM] [--csv]`: the ROI report through the billing API.
`tollway report chargeback --team T --by tag:project|end_user [--period YYYY-MM] [--json]`: the period's
invoice usage split by tag value or end user (CSV with a TOTAL row equal to the invoice's usage amount)."""

from __future__ import annotations

import argparse
import json
import sys

from tollway.billing_client import call, client, get_csv, guarded
from tollway.invoices_cli import TOKENS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    rep = subparsers.add_parser("report", help="reports from the billing API")
    sub = rep.add_subparsers(dest="report_command", metavar="{roi,chargeback}", required=True)
    roi = sub.add_parser("roi", help="savings against baseline prices, per team and month")
    roi.add_argument("--team", help="team id or name (required for admin/finance tokens)")
    roi.add_argument("--period", help="YYYY-MM (default: the current month)")
    roi.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    cb = sub.add_parser("chargeback", help="a team-month's invoice usage by tag value or end user (CSV)")
    cb.add_argument("--team", help="team id or name (admin/finance: leave out for every team, with an ALL row)")
    cb.add_argument("--period", help="YYYY-MM (default: the current month)")
    cb.add_argument("--by", required=True, help="end_user or tag:<name> (e.g. tag:project)")
    cb.add_argument("--json", action="store_true", help="JSON instead of CSV")
    return rep


def run(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("team", args.team), ("period", args.period)) if v}
    path = f"/v1/reports/{args.report_command}"
    if args.report_command == "chargeback":
        params["by"] = args.by
        as_csv = not args.json
    else:
        as_csv = args.csv

    def action() -> None:
        with client(*TOKENS) as c:
            if as_csv:
                sys.stdout.write(get_csv(c, path, params))
            else:
                print(json.dumps(call(c, "GET", path, params={**params, "format": "json"}), indent=2))

    return guarded("report", action)
