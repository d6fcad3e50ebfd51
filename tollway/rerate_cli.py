"""`tollway rerate --period YYYY-MM`: price held events and correct the period to the current catalog.

Writes adjustment rows (and priced copies of held events); never mutates a stored row; running it twice
adds nothing. Opens ClickHouse directly: with the embedded engine, run it while `tollway up` is stopped.
Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser("rerate", help="re-price a period with signed adjustment rows (idempotent)")
    p.add_argument("--period", required=True, help="YYYY-MM (UTC month)")
    return p


async def _rerate(period: str) -> dict[str, Any]:
    from schemas.clickhouse import Store
    from schemas.config import load_config
    from schemas.price_versions import check_and_record
    from schemas.prices import PriceBook
    from schemas.settings import CommonSettings
    from services.meter.rerate import rerate_period
    from services.meter.rollups import refresh

    s = CommonSettings()
    config = load_config(s.config)
    book = PriceBook(config)
    store = Store(s.resolved_clickhouse_url(), s.clickhouse_database)
    await store.open()
    try:
        await store.migrate()
        await check_and_record(store, config, "rerate")  # an in-place edit raises (a ConfigError): exit 1
        started = datetime.now(UTC)
        result = await rerate_period(store, book, period)
        await refresh(store, started)  # the rollups of the corrected hours, now rather than at the next meter pass
        return result.as_dict()
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    from schemas.config import ConfigError

    try:
        out = asyncio.run(_rerate(args.period))
    except (ValueError, ConfigError) as err:
        print(f"tollway rerate: {err}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0
