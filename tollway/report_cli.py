"""`tollway report roi --team T [--period YYYY-MM] [--csv]`: the ROI report through the billing API."""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from tollway.invoices_cli import client
from tollway.keys_cli import CliError, _call


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
    try:
        with client() as c:
            if args.csv:
                resp = c.get("/v1/reports/roi", params=params, headers={"Accept": "text/csv"})
                if not resp.is_success:
                    raise CliError(f"GET /v1/reports/roi -> {resp.status_code}: {resp.text[:200]}")
                sys.stdout.write(resp.text)
            else:
                print(json.dumps(_call(c, "GET", "/v1/reports/roi", params=params), indent=2))
    except CliError as e:
        print(f"tollway report: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"tollway report: cannot reach billing: {e}", file=sys.stderr)
        return 1
    return 0
