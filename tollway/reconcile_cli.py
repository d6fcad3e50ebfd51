"""`tollway reconcile --period YYYY-MM [--team T] [--direct]`: the reconciliation report as JSON.

By default asks the billing API (`TOLLWAY_BILLING_URL`, `TOLLWAY_ADMIN_TOKEN`): with the embedded engine
only the running process may open ClickHouse. `--direct` runs the same report (services/billing/reconcile.py)
against ClickHouse itself (a ClickHouse server, or the embedded engine while `tollway up` is stopped), with the
config of `TOLLWAY_CONFIG` for the invoice drafts. Exit 0 when `ok`, 3 when the report lists a problem, 1 on
error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx

from tollway.billing_client import CliError, call, client


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser("reconcile", help="gaps, duplicates, DLQ, unpriced, metered vs rolled-up/invoiced")
    p.add_argument("--period", required=True, help="YYYY-MM (UTC month)")
    p.add_argument("--team", help="only this team id (or name, via the API)")
    p.add_argument("--direct", action="store_true", help="query ClickHouse directly instead of the billing API")
    return p


async def _direct(period: str, team: str | None) -> dict[str, Any]:
    from schemas.clickhouse import Store
    from schemas.config import load_config
    from schemas.settings import CommonSettings
    from services.billing.accounts import Accounts
    from services.billing.invoices import Invoices
    from services.billing.reconcile import reconcile_report
    from tollway.logs import configure_logging

    s = CommonSettings()
    configure_logging("warning", s.log_format)  # stdout carries the JSON report only; logs go to stderr
    config = load_config(s.config)
    store = Store(s.resolved_clickhouse_url(), s.clickhouse_database)
    await store.open()
    try:
        await store.migrate()
        accounts = Accounts(store, config)
        await accounts.load()
        found = accounts.find_team(team) if team is not None else None
        team_id = found.team_id if found is not None else team
        teams = {t.team_id: t for t in accounts.teams()}
        return await reconcile_report(store, period, team_id, invoices=Invoices(store, config), teams=teams)
    finally:
        await store.close()


def _api(period: str, team: str | None) -> dict[str, Any]:
    params = {"period": period} | ({"team": team} if team else {})
    with client("TOLLWAY_ADMIN_TOKEN", "TOLLWAY_FINANCE_TOKEN", timeout_s=120.0) as c:
        return call(c, "GET", "/v1/reconcile", params=params)


def run(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_direct(args.period, args.team)) if args.direct else _api(args.period, args.team)
    except (CliError, RuntimeError, ValueError, httpx.HTTPError) as err:
        print(f"tollway reconcile: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 3
