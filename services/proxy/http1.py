"""A keep-alive HTTP/1.1 client for the non-streamed upstream hop: one `asyncio.Protocol` per connection and
httptools (llhttp, C) to parse the answer.

Why not aiohttp here too: a profile of the proxy under load put a fifth of its CPU inside aiohttp's request
machinery (ClientRequest/ClientResponse objects, auto headers, the timer context, the connector's
bookkeeping), ~0.1 ms a call, for a hop that is always "POST these bytes to a provider we configured, read
the whole answer". The request head is built once per (target, path); a call writes one buffer and waits on
one future. Streamed calls keep aiohttp (its reader is what the SSE relay consumes).

Behaviour matches what the hop had with aiohttp: no automatic retry of a POST on a dropped keep-alive
connection (the forward() layer owns retries, with backoff and health), no cookies, no compression asked for
(a provider that compresses anyway is decoded), connections idle longer than `keepalive_s` are not reused,
a cap on open connections, a total timeout per call and a connect timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpResponseParser


class UpstreamDisconnected(ConnectionError):
    """The provider closed the connection before a complete answer."""


class UpstreamProtocolError(ConnectionError):
    """The provider's answer was not HTTP/1.1 we can read."""


class UpstreamTooLarge(UpstreamProtocolError):
    """The provider's answer (as sent, or decompressed) is larger than the pool's `max_body_bytes`."""


DEFAULT_MAX_BODY = 128 * 1024 * 1024  # the largest embeddings answer (2,048 x 3,072 floats as JSON) is ~80 MB


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one (provider, path) goes, with the request head up to the content length, built once."""

    host: str
    port: int
    tls: bool
    head: bytes  # b"POST /path HTTP/1.1\r\nhost: ...\r\n...content-length: "


def endpoint(base_url: str, path: str, headers: dict[str, str]) -> Endpoint:
    u = urlsplit(base_url + path)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {base_url + path!r}")
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    host = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
    if ":" in u.hostname:  # IPv6 literal
        host = f"[{u.hostname}]" + (f":{u.port}" if u.port else "")
    lines = [f"POST {target} HTTP/1.1", f"host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")]
    head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
    return Endpoint(u.hostname, port, tls, head)


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one exchange at a time."""

    __slots__ = (
        "_decoder",
        "_framed",
        "_size",
        "closed",
        "done",
        "idle_since",
        "keep_alive",
        "key",
        "max_body",
        "parser",
        "parts",
        "retry_after",
        "status",
        "transport",
        "waiter",
    )  # fmt: skip

    def __init__(self, key: tuple[str, int, bool], max_body: int = DEFAULT_MAX_BODY) -> None:
        self.key = key
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.parts: list[bytes] = []
        self._size = 0
        self.retry_after: str | None = None
        self.keep_alive = True
        self.done = False
        self._framed = False  # the answer says where it ends (content-length or chunked)
        self._decoder: str | None = None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes on an idle connection: nothing asked for them, so it can't be reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except HttpParserError as err:
            self._fail(UpstreamProtocolError(f"unreadable HTTP answer: {err}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if exc is None and self.status and not self._framed and not self.done:
            self.done = True  # an answer delimited by the end of the connection (old HTTP/1.0 style)
            self.keep_alive = False
            self.waiter.set_result(None)
            return
        self._fail(UpstreamDisconnected(f"connection closed before a complete answer ({exc or 'EOF'})"))

    # ---- httptools callbacks ----

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        if n == 11 and name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif (n == 14 and name.lower() == b"content-length") or (n == 17 and name.lower() == b"transfer-encoding"):
            self._framed = True
        elif n == 16 and name.lower() == b"content-encoding":
            coding = value.strip().lower()
            if coding not in (b"", b"identity"):
                self._decoder = coding.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            # httptools ignores a callback's exception: fail the waiter and drop the connection instead
            self.parts.clear()
            self._fail(UpstreamTooLarge(f"answer larger than {self.max_body} bytes"))
            self.close()
            return
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # 1xx (e.g. 100 Continue): the real answer follows on the same connection
            self.status = 0
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # ---- used by Http1Pool ----

    def _fail(self, err: Exception) -> None:
        self.keep_alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(err)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def body(self) -> bytes:
        raw = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        if self._decoder is None:
            return raw
        if self._decoder in ("gzip", "x-gzip", "deflate"):
            try:
                return self._inflate(raw, 47)  # 47: gzip or zlib header, detected
            except zlib.error:
                if self._decoder == "deflate":
                    return self._inflate(raw, -15)  # some servers send raw deflate
                raise
        raise UpstreamProtocolError(f"provider answered with content-encoding {self._decoder!r}")

    def _inflate(self, raw: bytes, wbits: int) -> bytes:
        """Decompressed, but never past `max_body` (a 32 KB gzip can expand to gigabytes)."""
        d = zlib.decompressobj(wbits=wbits)
        out = d.decompress(raw, self.max_body + 1)
        if len(out) > self.max_body or d.unconsumed_tail:
            raise UpstreamTooLarge(f"answer larger than {self.max_body} bytes once decompressed")
        return out


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("upstream call timed out"))


class Http1Pool:
    """Keep-alive connections per (host, port, tls), most recently used first, at most `max_connections` open."""

    def __init__(self, max_connections: int = 512, keepalive_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> None:  # fmt: skip
        self.max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._ssl = ssl_context  # None: the system's CAs, made on the first https connection
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def post(
        self, ep: Endpoint, body: bytes, timeout_s: float, connect_timeout_s: float
    ) -> tuple[int, bytes, str | None]:
        """One exchange: (status, body, Retry-After). Raises TimeoutError, OSError (incl. UpstreamDisconnected,
        UpstreamProtocolError, ssl errors) for a call that got no complete answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = await self._acquire(ep, min(connect_timeout_s, timeout_s), deadline)
        waiter = loop.create_future()
        conn.waiter = waiter
        timer = loop.call_at(deadline, _expire, waiter)
        ok = False
        try:
            conn.transport.write(ep.head + b"%d\r\n\r\n" % len(body) + body)  # type: ignore[union-attr]
            await waiter
            result = (conn.status, conn.body(), conn.retry_after)
            ok = conn.keep_alive
            return result
        finally:
            timer.cancel()
            conn.waiter = None
            self._release(conn, reuse=ok)

    async def _acquire(self, ep: Endpoint, connect_timeout_s: float, deadline: float) -> Connection:
        key = (ep.host, ep.port, ep.tls)
        while True:
            if self._closed:
                raise UpstreamDisconnected("client closed")
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive_s:
                    conn._reset()
                    return conn
                self._drop(conn)
            if self._open < self.max_connections:
                return await self._connect(key, connect_timeout_s)
            if not self._evict_one_idle():  # every slot busy: wait for one to come back
                fut = asyncio.get_running_loop().create_future()
                self._waiting.append(fut)
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(fut, timeout=max(remaining, 0.0))
                finally:
                    if not fut.done():
                        fut.cancel()

    async def _connect(self, key: tuple[str, int, bool], connect_timeout_s: float) -> Connection:
        host, port, tls = key
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._open += 1
        try:
            _, conn = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(
                    lambda: Connection(key, self.max_body_bytes), host, port, ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                ),
                timeout=connect_timeout_s,
            )  # fmt: skip
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return conn

    def _release(self, conn: Connection, reuse: bool) -> None:
        if reuse and not conn.closed and not self._closed and conn.done:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
            self._wake()
        else:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1
        self._wake()

    def _evict_one_idle(self) -> bool:
        """At the cap with idle connections to another host: close one so this host can connect."""
        for conns in self._idle.values():
            if conns:
                self._drop(conns.pop(0))
                return True
        return False

    def _wake(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.cancel()
