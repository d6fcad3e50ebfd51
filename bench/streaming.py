"""Time to first token through a streamed call (chat, or Anthropic Messages): a blocking keep-alive socket
client, one call at a time.

wrk cannot see inside a response, so this measures the moment the first non-empty content delta arrives.
The same client measures direct and proxied calls, so its own cost cancels out of the difference.
"""

from __future__ import annotations

import re
import socket
import statistics
import time
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
