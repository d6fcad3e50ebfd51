"""The floor under any Python gateway on this stack: uvicorn (httptools, uvloop) and an ASGI app that forwards
the body through Tollway's HTTP/1.1 client and returns the answer. No auth, limits, routing or events.

What it adds over direct is what the server hop and the client hop cost before any gateway logic runs, so
`tollway - floor` (same run) is what Tollway's own request path costs. Run by the bench (`variants` part):

    BENCH_FLOOR_UPSTREAM=http://127.0.0.1:9100/v1 uvicorn bench.floor_app:app
"""

from __future__ import annotations

import os

from services.proxy.http1 import Http1Pool, endpoint

_pool = Http1Pool(256)
_ep = endpoint(os.environ.get("BENCH_FLOOR_UPSTREAM", "http://127.0.0.1:9100/v1"), "/chat/completions",
               {"content-type": "application/json"})  # fmt: skip


async def app(scope: dict, receive, send) -> None:
    if scope["type"] != "http":
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    status, body, _ = await _pool.post(_ep, b"".join(parts), 60.0, 5.0)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
