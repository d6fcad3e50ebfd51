"""The plain upstream hop's HTTP/1.1 client against real sockets: framing, keep-alive, limits and failures."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import Awaitable, Callable

import pytest

from services.proxy.errors import GatewayError
from services.proxy.http1 import Http1Pool, UpstreamDisconnected, UpstreamProtocolError, endpoint
from services.proxy.routing import Target
from services.proxy.upstream import post_json

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].encode(), headers, body


class Server:
    """A loopback HTTP server whose answers each test writes by hand (bytes on the wire, nothing smoothed)."""

    def __init__(
        self, answer: Callable[[int, tuple[bytes, dict, bytes]], bytes | None], tls: ssl.SSLContext | None = None
    ):
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[bytes, dict, bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        while True:
            req = await read_request(reader)
            if req is None:
                break
            self.requests.append(req)
            out = self.answer(len(self.requests), req)
            if out is None:  # hang up without answering
                writer.close()
                return
            if out == b"":  # never answer
                await asyncio.sleep(3600)
            writer.write(out)
            await writer.drain()
            if b"connection: close" in out.lower():
                writer.close()
                return
        writer.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


async def test_request_bytes_and_keep_alive_reuse() -> None:
    async with Server(lambda n, req: ok(b'{"n":%d}' % n)) as srv:
        pool = Http1Pool(4)
        ep = endpoint(f"http://127.0.0.1:{srv.port}/v1", "/chat/completions",
                      {"content-type": "application/json", "authorization": "Bearer sk-up", "Host": "evil"})  # fmt: skip
        for i in range(1, 4):
            status, body, retry_after = await pool.post(ep, b'{"model":"m"}', 5, 5)
            assert (status, body, retry_after) == (200, b'{"n":%d}' % i, None)
        assert srv.connections == 1  # one connection carried all three calls
        line, headers, body = srv.requests[0]
        assert line == b"POST /v1/chat/completions HTTP/1.1"
        assert headers["host"] == f"127.0.0.1:{srv.port}"  # ours, never a configured one
        assert headers["authorization"] == "Bearer sk-up" and headers["content-length"] == "13"
        assert "accept-encoding" not in headers and body == b'{"model":"m"}'
        assert pool.open_connections == 1
        await pool.close()


async def test_chunked_gzip_and_retry_after_are_read() -> None:
    payload = b'{"choices":[],"usage":{"prompt_tokens":3}}'
    packed = gzip.compress(payload)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (packed[:10], packed[10:])) + b"0\r\n\r\n"

    def answer(n: int, req: tuple) -> bytes:
        if n == 1:
            return (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-encoding: gzip\r\n\r\n"
                + chunks
            )
        return b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\ncontent-length: 2\r\n\r\n{}"

    async with Server(answer) as srv:
        pool = Http1Pool(4)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        assert await pool.post(ep, b"{}", 5, 5) == (200, payload, None)
        assert await pool.post(ep, b"{}", 5, 5) == (429, b"{}", "7")
        assert srv.connections == 1
        await pool.close()


async def test_connection_close_and_eof_delimited_answers_are_not_reused() -> None:
    def answer(n: int, req: tuple) -> bytes:
        if n == 1:
            return ok(b"{}", b"connection: close\r\n")
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b'{"until":"eof"}'  # no length: ends at close

    async with Server(answer) as srv:
        pool = Http1Pool(4)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        assert (await pool.post(ep, b"{}", 5, 5))[1] == b"{}"
        assert (await pool.post(ep, b"{}", 5, 5))[1] == b'{"until":"eof"}'
        assert srv.connections == 2 and pool.open_connections == 0
        await pool.close()


async def test_hang_up_garbage_and_timeout_fail_and_free_the_slot() -> None:
    answers = {1: None, 2: b"SMTP ready\r\n\r\n", 3: b""}
    async with Server(lambda n, req: answers[n]) as srv:
        pool = Http1Pool(4)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        with pytest.raises(UpstreamDisconnected):
            await pool.post(ep, b"{}", 5, 5)
        with pytest.raises(UpstreamProtocolError):
            await pool.post(ep, b"{}", 5, 5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await pool.post(ep, b"{}", 0.2, 5)
        assert 0.15 < loop.time() - t0 < 2
        assert pool.open_connections == 0 and srv.connections == 3
        await pool.close()


async def test_transport_failures_become_retryable_gateway_errors() -> None:
    async with Server(lambda n, req: None) as srv:
        pool = Http1Pool(4)
        target = Target("up", f"http://127.0.0.1:{srv.port}", "m", {}, 5.0, 1.0, 1.0)
        with pytest.raises(GatewayError) as err:
            await post_json(pool, target, "/chat/completions", b"{}")
        assert err.value.retryable and err.value.status == 503 and "UpstreamDisconnected" in err.value.message
        port = srv.port
    with pytest.raises(GatewayError) as err:  # nothing listens any more: refused
        await post_json(pool, Target("up", f"http://127.0.0.1:{port}", "m", {}, 5.0, 1.0, 1.0), "/x", b"{}")
    assert err.value.retryable and "unreachable" in err.value.message
    await pool.close()


async def test_connection_cap_queues_callers_and_cancel_frees_the_slot() -> None:
    async with Server(lambda n, req: ok()) as srv:
        pool = Http1Pool(max_connections=1)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        results = await asyncio.gather(*(pool.post(ep, b"{}", 5, 5) for _ in range(5)))
        assert [r[0] for r in results] == [200] * 5
        assert srv.connections == 1  # five calls, one at a time on the only connection
        await pool.close()

    async with Server(lambda n, req: b"") as srv:  # never answers
        pool = Http1Pool(max_connections=1)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        task = asyncio.create_task(pool.post(ep, b"{}", 30, 5))
        await asyncio.sleep(0.2)
        assert pool.open_connections == 1
        task.cancel()  # the client went away mid-call
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        with pytest.raises(TimeoutError):  # the slot is free again: a new call gets a connection (and waits)
            await pool.post(ep, b"{}", 0.2, 5)
        assert srv.connections == 2
        await pool.close()


async def test_idle_connections_expire_and_server_closed_ones_are_skipped() -> None:
    async with Server(lambda n, req: ok()) as srv:
        pool = Http1Pool(4, keepalive_s=0.1)
        ep = endpoint(f"http://127.0.0.1:{srv.port}", "/x", {})
        await pool.post(ep, b"{}", 5, 5)
        await asyncio.sleep(0.2)
        await pool.post(ep, b"{}", 5, 5)
        assert srv.connections == 2  # idle past keepalive_s: not reused
        pool.keepalive_s = 60
        for w in srv.writers:
            w.close()  # the server drops its idle connections
        await asyncio.sleep(0.1)
        assert (await pool.post(ep, b"{}", 5, 5))[0] == 200  # no error: a fresh connection
        assert srv.connections == 3
        await pool.close()


@pytest.fixture
def self_signed(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    return str(cert), str(key)


async def test_https_with_certificate_verification(self_signed: tuple[str, str]) -> None:
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with Server(lambda n, req: ok(b'{"tls":true}'), tls=server_ctx) as srv:
        trusting = ssl.create_default_context(cafile=cert)
        pool = Http1Pool(4, ssl_context=trusting)
        ep = endpoint(f"https://127.0.0.1:{srv.port}", "/x", {})
        assert (await pool.post(ep, b"{}", 5, 5))[1] == b'{"tls":true}'
        assert (await pool.post(ep, b"{}", 5, 5))[1] == b'{"tls":true}'
        assert srv.connections == 1
        await pool.close()
        strict = Http1Pool(4)  # the system's CAs: a self-signed provider is refused
        with pytest.raises(ssl.SSLError):
            await strict.post(ep, b"{}", 5, 5)
        assert strict.open_connections == 0
        await strict.close()


def test_endpoint_builds_the_head_once() -> None:
    ep = endpoint("https://api.example.com/openai/v1", "/embeddings?api-version=1", {"x-k": "v", "content-length": "9"})
    assert (ep.host, ep.port, ep.tls) == ("api.example.com", 443, True)
    assert ep.head == (b"POST /openai/v1/embeddings?api-version=1 HTTP/1.1\r\nhost: api.example.com\r\nx-k: v\r\n"
                       b"content-length: ")  # fmt: skip
    with pytest.raises(ValueError):
        endpoint("ftp://x", "/y", {})
