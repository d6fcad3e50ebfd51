"""`tollway report roi --team T [--period YYYY-MM] [--csv]`: the ROI report through the billing API."""

from __future__ import annotations

import argparse
import json
import sys

from tollway.billing_client import call, client, get_csv, guarded
from tollway.invoices_cli import TOKENS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    rep = subparsers.add_parser("report", help="reports from the billing API")
    sub = rep.add_subparsers(dest="report_command", metavar="{roi}", required=True)
    roi = sub.add_parser("roi", help="savings against baseline prices, per team and month")
    roi.add_argument("--team", help="team id or name (required for admin/finance tokens)")
    roi.add_argument("--period", help="YYYY-MM (default: the current month)")
    roi.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    return rep


def run(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("team", args.team), ("period", args.period)) if v}

    def action() -> None:
        with client(*TOKENS) as c:
            if args.csv:
                sys.stdout.write(get_csv(c, "/v1/reports/roi", params))
            else:
                print(json.dumps(call(c, "GET", "/v1/reports/roi", params=params), indent=2))

    return guarded("report", action)
