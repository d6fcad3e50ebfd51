"""`tollway proxy` with a proposed hot-path change applied at start, to measure it before anyone makes it.

BENCH_PROXY_VARIANT is a comma list:
- `aiohttp`: the non-streamed upstream call goes through one aiohttp ClientSession instead of httpx's pool
  (services/proxy/upstream.py:post_json, same signature, same error mapping);
- `fastpath`: the chat route served by a plain Starlette endpoint ahead of FastAPI (services/proxy/app.py);
- `uvloop`: the bench puts uvloop + httptools (bench/envs/fastserver) on PYTHONPATH: uvicorn's "auto" HTTP parser
  picks httptools by itself, but the loop is made by `asyncio.run` in tollway/cli.py, so uvloop only runs
  when installed as the loop policy here.
Nothing in services/ is edited; this module only exists for the bench (part `variants`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any


def use_aiohttp_upstream() -> None:
    import aiohttp
    import orjson

    from services.proxy import handler, upstream
    from services.proxy.errors import UpstreamTimeout, UpstreamUnavailable

    sessions: dict[Any, aiohttp.ClientSession] = {}

    def session() -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        s = sessions.get(loop)
        if s is None:
            # limit=0: no cap, like the proxy's 512-connection httpx pool never reached in practice
            s = sessions[loop] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                                                       skip_auto_headers=("User-Agent",))  # fmt: skip
        return s

    async def post_json(client: Any, target: Any, path: str, body: bytes, budget_s: float | None = None) -> Any:
        total = target.timeout_s if budget_s is None else max(min(target.timeout_s, budget_s), 0.001)
        timeout = aiohttp.ClientTimeout(total=total, connect=min(target.connect_timeout_s, total))
        headers = {"content-type": "application/json", **target.headers}
        try:
            async with session().post(target.base_url + path, data=body, headers=headers, timeout=timeout) as resp:
                raw = await resp.read()
                status, retry_after = resp.status, resp.headers.get("retry-after")
        except TimeoutError as err:
            raise upstream._transport(UpstreamTimeout(f"provider '{target.provider}' timed out")) from err
        except aiohttp.ClientError as err:
            raise upstream._transport(
                UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}")
            ) from err
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        return upstream.UpstreamReply(status, raw, data, retry_after)

    upstream.post_json = post_json
    handler.post_json = post_json  # the handler imported the name


def use_fast_path() -> None:
    """POST /v1/chat/completions served by a plain Starlette endpoint in front of the FastAPI app, so the hot
    path skips FastAPI's middleware stack and route table; everything else (lifespan included) falls through."""
    from starlette.routing import request_response

    from services.proxy import app as proxy_app

    original = proxy_app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)

        async def chat(request: Any) -> Any:
            return await request.app.state.handler.chat_completions(request)

        fast = {"/v1/chat/completions": request_response(chat)}

        async def dispatch(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "POST":
                endpoint = fast.get(scope["path"])
                if endpoint is not None:
                    scope["app"] = app  # request.app.state is the FastAPI app's, set up by its lifespan
                    await endpoint(scope, receive, send)
                    return
            await app(scope, receive, send)

        return dispatch

    proxy_app.create_app = create_app


def main() -> int:
    variant = {v.strip() for v in os.environ.get("BENCH_PROXY_VARIANT", "").split(",") if v.strip()}
    if "aiohttp" in variant:
        use_aiohttp_upstream()
    if "fastpath" in variant:
        use_fast_path()
    if "uvloop" in variant:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from tollway.cli import main as tollway_main

    return tollway_main(["proxy"])


if __name__ == "__main__":
    sys.exit(main())
