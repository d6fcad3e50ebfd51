"""uvicorn's httptools protocol with the limits it lacks: a cap on header bytes (431), a deadline to finish the
headers (408) and one to finish the body (408), and a per-server connection cap (503), each answered in
OpenAI's error shape and followed by a close.

Why a subclass: uvicorn 0.54 has none of these for httptools (`h11_max_incomplete_event_size` is h11's only;
`limit_concurrency` answers a plain-text 503 only once a request's headers are in, so slow connections stay
held). A probe held 2,000 dripping connections for 60 s, and 8 unfinished 50 MB headers took RSS from 514 to
908 MB. The checks cost the request path a few attribute writes: the deadlines are swept once a second from
the server's own tick (`GuardedServer.on_tick` in tollway/servers.py), not armed as a timer per request.

Relies on uvicorn internals (`HttpToolsProtocol` callbacks, `cycle`, `flow`, `connections`, `_start_asgi_task`),
so uvicorn is pinned below 0.55 and tests/e2e/test_hostile_input.py fails if any of it moves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger("tollway.http")
REFUSED = Counter("tollway_http_refused_total", "Connections answered and closed by the server limits",
                  ["reason"])  # fmt: skip


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


def _answer(status: int, reason: str, message: str, type_: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")  # fmt: skip
    return head.encode("latin-1") + body


# where the parser is on a connection, for the byte count and the deadline sweep
_IDLE, _HEAD, _BODY = 0, 1, 2  # between messages / inside a request head / inside a request body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: Limits  # set on the per-server subclass made by `protocol_for`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._deadline = 0.0
        self._head_bytes = 0
        self._over_cap = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a connection that never sends a byte is held no longer than one that drips its headers
        self._deadline = self.loop.time() + self.limits.header_timeout_s
        if len(self.connections) > self.limits.max_connections:
            self._over_cap = True  # answered 503 once its request head is in (see _start_asgi_task)

    def data_received(self, data: bytes) -> None:
        if self._phase != _BODY:  # bytes between messages count toward the next head (pipelining included)
            self._head_bytes += len(data)
        super().data_received(data)
        # counted before the parser sees the chunk, judged after: a chunk that completes the headers and
        # carries body bytes is not a big header. What the parser holds stays under the cap + one read.
        if self._phase != _BODY and self._head_bytes > self.limits.max_header_bytes and self.parser is not None:
            limit = self.limits.max_header_bytes
            self._refuse(431, "Request Header Fields Too Large", f"Request headers exceed {limit} bytes.",
                         "request_header_fields_too_large")  # fmt: skip

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        self._deadline = self.loop.time() + self.limits.header_timeout_s

    def on_headers_complete(self) -> None:
        self._phase, self._head_bytes = _BODY, 0
        self._deadline = self.loop.time() + self.limits.body_timeout_s
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # the app has the request; an idle keep-alive connection is uvicorn's keep-alive timeout's to cut
        self._phase, self._deadline, self._head_bytes = _IDLE, 0.0, 0

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if self._over_cap:
            cycle.keep_alive = False
            app = _too_many_connections
        super()._start_asgi_task(cycle, app)

    # ---- the sweep ----

    def check_deadline(self, now: float) -> None:
        if not self._deadline or now < self._deadline or self.transport.is_closing():
            return
        if self.flow.read_paused:
            return  # we stopped reading (the app is behind, or a pipelined request waits): not the client's delay
        if self._phase == _IDLE:
            REFUSED.labels("silent_connection").inc()
            self.transport.close()  # connected and silent: nothing asked, nothing to answer
        elif self._phase == _HEAD:
            self._refuse(408, "Request Timeout", f"Request headers not received within {self.limits.header_timeout_s:g} s.",
                         "request_header_timeout")  # fmt: skip
        elif self._phase == _BODY:
            # the app is waiting on receive(): closing makes it see http.disconnect (a 499 in the proxy's events)
            log.info("request_body_timeout", timeout_s=self.limits.body_timeout_s,
                     path=self.scope.get("path") if self.scope else None)  # fmt: skip
            self._refuse(408, "Request Timeout", f"Request body not received within {self.limits.body_timeout_s:g} s.",
                         "request_body_timeout")  # fmt: skip

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        REFUSED.labels(code).inc()
        self._deadline = 0.0
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_answer(status, reason, message, "invalid_request_error", code))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's answer, if any, has nowhere to go
            self.cycle.message_event.set()
        self.transport.close()


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    REFUSED.labels("too_many_connections").inc()
    body = orjson.dumps({"error": {"message": "The server has too many open connections; retry shortly.",
                                   "type": "api_error", "code": "too_many_connections"}})  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), (b"retry-after", b"1")]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protocol_for(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to one server's limits (uvicorn builds protocols from a class)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def sweep(connections: set[Any], now: float) -> None:
    for conn in list(connections):
        check = getattr(conn, "check_deadline", None)
        if check is not None:
            check(now)
