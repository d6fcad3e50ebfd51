"""`tollway proxy` with one hot-path change taken back out at start, to measure what each change buys.

The proposals measured here before (P1 aiohttp upstream, P2 uvloop + httptools, P3 fast path ahead of FastAPI,
P13 the HTTP/1.1 client for the plain hop) are in the product now (services/proxy/, tollway/cli.py,
tollway/servers.py); each variant removes one:

BENCH_PROXY_VARIANT is a comma list:
- `asyncio`: asyncio's own loop and uvicorn's h11 parser instead of uvloop + httptools (P2);
- `fastapi`: the proxied endpoints served through FastAPI's stack instead of ProxyApp's dispatch (P3);
- `aiohttp`: plain (non-streamed) upstream calls through the aiohttp session again, as streams still go,
  instead of services/proxy/http1.py (P13).
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


def without_http1() -> None:
    import aiohttp

    from services.proxy import handler, upstream

    timeouts: dict = {}

    async def post_json_aiohttp(pool, target, path, body, budget_s=None, headers=None):
        # the P1 code path: the app's aiohttp session (st.upstream), whole body read, same error mapping
        session = handler_state["app"].state.proxy.upstream
        timeout = timeouts.get(target.timeout_s) or timeouts.setdefault(
            target.timeout_s, aiohttp.ClientTimeout(total=target.timeout_s, connect=target.connect_timeout_s)
        )
        try:
            async with session.post(upstream._url(target.base_url, path), data=body,
                                    headers={**target.headers, **headers} if headers else target.headers,
                                    timeout=timeout) as resp:  # fmt: skip
                raw = await resp.read()
                status, retry_after = resp.status, resp.headers.get("retry-after")
        except upstream.TRANSPORT_ERRORS as err:
            raise upstream.transport_failure(target, err) from err
        return upstream.UpstreamReply(status, raw, upstream._json(raw), retry_after)

    handler.post_json = post_json_aiohttp
    from services.proxy import app as app_module

    create = app_module.create_app

    def create_app(*args, **kwargs):
        handler_state["app"] = create(*args, **kwargs)
        return handler_state["app"]

    app_module.create_app = create_app


handler_state: dict = {}


def main() -> int:
    variant = {v.strip() for v in os.environ.get("BENCH_PROXY_VARIANT", "").split(",") if v.strip()}
    if "asyncio" in variant:
        without_uvloop()
    if "fastapi" in variant:
        without_fast_path()
    if "aiohttp" in variant:
        without_http1()
    from tollway.cli import main as tollway_main

    return tollway_main(["proxy"])


if __name__ == "__main__":
    sys.exit(main())
