"""`tollway proxy` with one hot-path change taken back out at start, to measure what each change buys.

The proposals measured here before (P1 aiohttp upstream, P2 uvloop + httptools, P3 fast path ahead of FastAPI)
are in the product now (services/proxy/, tollway/cli.py, tollway/servers.py); each variant removes one:

BENCH_PROXY_VARIANT is a comma list:
- `asyncio`: asyncio's own loop and uvicorn's h11 parser instead of uvloop + httptools (P2);
- `fastapi`: the proxied endpoints served through FastAPI's stack instead of ProxyApp's dispatch (P3).
Nothing in services/ is edited; this module only exists for the bench (part `variants`).
"""

from __future__ import annotations

import os
import sys


def without_uvloop() -> None:
    from tollway import cli, servers

    cli._loop_factory = lambda: None  # asyncio.Runner's default loop
    servers.HTTP_IMPL, servers.LOOP_IMPL = "h11", "asyncio"


def without_fast_path() -> None:
    from services.proxy.app import ProxyApp

    ProxyApp.fast_routes = {}  # every request goes through FastAPI's middleware stack and route table


def main() -> int:
    variant = {v.strip() for v in os.environ.get("BENCH_PROXY_VARIANT", "").split(",") if v.strip()}
    if "asyncio" in variant:
        without_uvloop()
    if "fastapi" in variant:
        without_fast_path()
    from tollway.cli import main as tollway_main

    return tollway_main(["proxy"])


if __name__ == "__main__":
    sys.exit(main())
