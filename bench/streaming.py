"""Time to first token through a streamed call (chat, or Anthropic Messages): a blocking keep-alive socket
client, one call at a time.

wrk cannot see inside a response, so this measures the moment the first non-empty content delta arrives.
The same client measures direct and proxied calls, so its own cost cancels out of the difference.
"""

from __future__ import annotations

import asyncio
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

FIRST_CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')
END = b"0\r\n\r\n"
DONE = b"[DONE]"
# Anthropic Messages: the first text delta, and the last event
MESSAGES_FIRST = re.compile(rb'"text_delta"\s*,\s*"text"\s*:\s*"[^"]')
MESSAGES_DONE = b'"type":"message_stop"'
# the Responses API's typed events: the first text delta, and the final event instead of [DONE]
RESPONSES_FIRST = re.compile(rb'"type"\s*:\s*"response\.output_text\.delta".{0,200}?"delta"\s*:\s*"[^"]')
RESPONSES_DONE = b"event: response.completed"


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    u = urlsplit(url)
    lines = [f"POST {u.path} HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(body)}"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def one_call(sock: socket.socket, req: bytes, first: re.Pattern[bytes] = FIRST_CONTENT,
             done: bytes = DONE) -> tuple[float, float] | None:  # fmt: skip
    """(ttft s, total s) of one call on an open connection, or None if the server closed it or failed."""
    t0 = time.perf_counter()
    sock.sendall(req)
    buf = b""
    ttft = None
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if not buf.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in buf:
            raise RuntimeError(f"stream call failed: {buf[:300]!r}")
        if ttft is None and first.search(buf):
            ttft = time.perf_counter() - t0
        if done in buf and buf.endswith(END):
            break
    if ttft is None:
        raise RuntimeError(f"stream carried no content: {buf[:300]!r}")
    return ttft, time.perf_counter() - t0


def measure(url: str, body: bytes, headers: dict[str, str], calls: int, warmup: int = 20,
            first: re.Pattern[bytes] = FIRST_CONTENT, done: bytes = DONE) -> dict:  # fmt: skip
    u = urlsplit(url)
    req = request_bytes(url, body, headers)
    sock = _connect(u.hostname or "127.0.0.1", u.port or 80)
    ttfts, totals = [], []
    try:
        for i in range(warmup + calls):
            got = one_call(sock, req, first, done)
            if got is None:  # the server does not keep streamed connections alive: reconnect, retry once
                sock.close()
                sock = _connect(u.hostname or "127.0.0.1", u.port or 80)
                got = one_call(sock, req, first, done)
                if got is None:
                    raise RuntimeError("connection closed mid-stream twice")
            if i >= warmup:
                ttfts.append(got[0])
                totals.append(got[1])
    finally:
        sock.close()
    return {"calls": calls, "ttft_p50_ms": pct(ttfts, 50) * 1000, "ttft_p99_ms": pct(ttfts, 99) * 1000,
            "total_p50_ms": pct(totals, 50) * 1000, "total_p99_ms": pct(totals, 99) * 1000}  # fmt: skip


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, max(0, round(p * 10) - 1))]


# ---------------------------------------------------------------- same-run A/B of streamed TTFT per API

APIS = ("chat", "messages", "responses")


def api_call(t, api: str) -> tuple[str, bytes, dict[str, str], re.Pattern[bytes], bytes]:
    """(url, body, headers, first-delta pattern, end marker) of one streamed call to `t` in `api`."""
    import orjson

    from bench.loadgen import chat_body, messages_body
    from bench.proxy_bench import responses_body

    if api == "chat":
        body = orjson.dumps(chat_body(t.models["instant"], stream=True))
        return t.urls["instant"], body, t.headers_for("instant"), FIRST_CONTENT, DONE
    if api == "messages":
        body = orjson.dumps(messages_body(t.messages_models["instant"], stream=True))
        return t.messages["instant"], body, t.messages_headers, MESSAGES_FIRST, MESSAGES_DONE
    url = t.urls["instant"].removesuffix("/chat/completions") + "/responses"
    body = orjson.dumps(responses_body(t.models["instant"], stream=True))
    return url, body, t.headers_for("instant"), RESPONSES_FIRST, RESPONSES_DONE


def main(argv: list[str] | None = None) -> int:
    """Direct and one or two Tollway builds in one run: streamed TTFT per API, every (api, target) measured in
    short rounds whose order alternates, so a shared box's drifting load falls on all of them alike.

    python -m bench.streaming --old /path/to/other/checkout --rounds 6 --calls 20
    (`--old`: a checkout whose services/ the second proxy imports, by PYTHONPATH; same venv)."""
    import argparse
    import json
    import os
    from pathlib import Path

    from bench import side_by_side, targets

    ap = argparse.ArgumentParser(prog="python -m bench.streaming")
    ap.add_argument("--old", help="a second checkout to run as the 'old' proxy")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=20, help="calls per (round, api, target)")
    ap.add_argument("--apis", default=",".join(APIS))
    args = ap.parse_args(argv)
    apis = args.apis.split(",")
    run_dir = targets.new_run_dir("stream")
    mock_urls, mocks = targets.start_mocks(run_dir)
    builds: dict[str, targets.Target] = {}
    try:
        builds["new"] = targets.start_tollway(run_dir, mock_urls, name="new")
        if args.old:
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(Path(args.old).resolve())  # the children inherit it (base_env)
            try:
                builds["old"] = targets.start_tollway(run_dir, mock_urls, name="old")
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
        every = {"direct": targets.direct(mock_urls), **builds}
        # the interleaved rounds of bench/side_by_side.py, streamed calls only, in this command's output shape
        got = side_by_side.run(every, args.rounds, args.calls, warmup=20, apis=apis, kinds=("stream",))
        out = {"load": got["load"], "rounds": args.rounds, "calls": args.calls, "apis": {}}
        for api, v in got["stream"].items():
            out["apis"][api] = {"direct_ttft_p50_ms": v["direct_p50_ms"],
                                **{f"{b}_added_ttft_p50_ms": v[f"{b}_added_p50_ms"] for b in builds}}  # fmt: skip
        print(json.dumps(out))
    finally:
        for t in builds.values():
            t.stop()
        for p in reversed(mocks):
            p.stop()
    return 0


# ---------------------------------------------------------------- in process: the proxy's own CPU to first delta


async def _mock_stream(api: str) -> list[bytes]:
    """One streamed answer of the project's mock upstream (in process), split as the mock writes it: one
    chunk per SSE event."""
    import httpx
    import orjson

    from bench.loadgen import chat_body, messages_body
    from bench.proxy_bench import responses_body
    from bench.targets import ANTHROPIC_HEADERS, ANTHROPIC_MODEL, UPSTREAM_MODEL
    from services.mock_upstream.app import create_app
    from services.mock_upstream.settings import MockSettings

    path, body, headers = {
        "chat": ("/v1/chat/completions", chat_body(UPSTREAM_MODEL, stream=True), {}),
        "messages": ("/v1/messages", messages_body(ANTHROPIC_MODEL, stream=True), ANTHROPIC_HEADERS),
        "responses": ("/v1/responses", responses_body(UPSTREAM_MODEL, stream=True), {}),
    }[api]
    transport = httpx.ASGITransport(app=create_app(MockSettings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        r = await client.post(path, content=orjson.dumps(body), headers=headers)
    return [e + b"\n\n" for e in r.content.split(b"\n\n") if e]


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c


class _Resp:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)
        self.status = 200

    def close(self) -> None:
        pass


async def stream_path(api: str, calls: int, profile: bool = False, reads: str = "event") -> dict[str, float]:
    """CPU (process time) per streamed call in the proxy's ASGI app, the upstream replaced by the mock's own
    bytes already buffered: to the first text delta handed to the server, and to the end of the stream.
    What the socket bench cannot separate from a shared box's noise: Tollway's work before the first token.

    reads: how the upstream bytes arrive. "event": one network read per SSE event (a provider slower than the
    proxy); "two": the first event, then all the rest in one read (the instant mock, which writes a whole
    stream in a few hundred microseconds while the proxy is still answering the first event)."""
    import cProfile
    import pstats
    import tempfile
    from pathlib import Path

    import orjson

    from bench.loadgen import chat_body, messages_body
    from bench.proxy_bench import responses_body
    from bench.targets import tollway_config
    from schemas.config import GatewayConfig
    from schemas.control import KeyState, TeamState
    from schemas.keys import display_prefix, hash_key, new_secret
    from services.proxy import handler, messages, responses
    from services.proxy.app import create_app
    from services.proxy.settings import ProxySettings

    chunks = await _mock_stream(api)
    if reads == "two":
        chunks = [chunks[0], b"".join(chunks[1:])]
    path, payload, auth, first = {
        "chat": ("/v1/chat/completions", chat_body("bench-instant", stream=True), "authorization", FIRST_CONTENT),
        "messages": ("/v1/messages", messages_body("bench-claude-instant", stream=True), "x-api-key", MESSAGES_FIRST),
        "responses": ("/v1/responses", responses_body("bench-instant", stream=True), "authorization",
                      re.compile(rb'"type":"response\.output_text\.delta"')),
    }[api]  # fmt: skip

    async def canned(session, target, path, body, budget_s=None, headers=None):
        return _Resp(chunks)

    real = handler.open_stream, messages.open_stream, responses.open_stream
    handler.open_stream = messages.open_stream = responses.open_stream = canned
    config = GatewayConfig.model_validate(
        tollway_config({"instant": "http://127.0.0.1:9", "50ms": "http://127.0.0.1:9"})
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            app = create_app(ProxySettings(data_dir=Path(tmp), proxy_instance="bench"), config, "127.0.0.1:1")
            async with app.router.lifespan_context(app):
                secret = new_secret()
                app.state.proxy.control.apply(TeamState(team_id="t1", name="t1", plan="bench"))
                app.state.proxy.control.apply(KeyState(key_id="k1", key_hash=hash_key(secret),
                                                       prefix=display_prefix(secret), team_id="t1"))  # fmt: skip
                body = orjson.dumps(payload)
                credential = f"Bearer {secret}" if auth == "authorization" else secret
                headers = [(b"host", b"proxy"), (b"content-type", b"application/json"),
                           (auth.encode(), credential.encode()), (b"content-length", b"%d" % len(body))]  # fmt: skip
                if api == "messages":
                    headers.append((b"anthropic-version", b"2023-06-01"))
                scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                         "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                         "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                         "server": ("127.0.0.1", 8080)}  # fmt: skip
                marks: list[float] = []

                async def one() -> tuple[float, float, int]:
                    t0 = time.process_time()
                    seen: list[float] = []
                    writes = 0
                    pending = [{"type": "http.request", "body": body, "more_body": False}]
                    never = asyncio.get_running_loop().create_future()

                    async def receive() -> dict:
                        if pending:
                            return pending.pop()
                        await never  # the client stays until the stream ends
                        return {"type": "http.disconnect"}

                    async def send(message: dict) -> None:
                        nonlocal writes
                        if message["type"] == "http.response.start" and message["status"] != 200:
                            raise RuntimeError(f"stream answered {message['status']}")
                        if message["type"] == "http.response.body":
                            if not seen:
                                writes += 1
                                if first.search(message.get("body", b"")):
                                    seen.append(time.process_time())

                    await app(dict(scope), receive, send)
                    if not seen:
                        raise RuntimeError("the stream carried no text delta")
                    return seen[0] - t0, time.process_time() - t0, writes

                for _ in range(300):
                    await one()
                runs = [await one() for _ in range(calls)]
                if profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(calls // 4):
                        await one()
                    prof.disable()
                    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                del marks
    finally:
        handler.open_stream, messages.open_stream, responses.open_stream = real
    return {"api": api, "calls": calls, "first_delta_cpu_us": round(statistics.median(r[0] for r in runs) * 1e6, 1),
            "stream_cpu_us": round(statistics.median(r[1] for r in runs) * 1e6, 1),
            "writes_to_first_delta": runs[0][2], "reads": reads}  # fmt: skip


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--in-process"]:
        import uvloop

        for name in sys.argv[2:] or APIS:
            for reads in ("event", "two"):
                print(__import__("json").dumps(uvloop.run(stream_path(name, 2000, reads=reads))), flush=True)
    else:
        raise SystemExit(main())
