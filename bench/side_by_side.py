"""The agent APIs beside chat at c=1: plain latency and streamed TTFT per API, direct and each gateway build
measured in short interleaved rounds.

Why not the sequential scenarios of bench.proxy_bench: there, /v1/messages at c=1 runs minutes after chat's
c=1, behind the c=64 runs whose events billing is still consuming on the mock's core, so the two numbers are
taken under different conditions. Here every (api, target) gets `calls` calls per round, the order reversed
every round, so drift and backlog fall on all of them alike; added = median through the build minus median
direct, per API. One keep-alive socket per (target, api, kind), opened and warmed before the first round.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import time
from urllib.parse import urlsplit

from bench import streaming

APIS = streaming.APIS
KINDS = ("plain", "stream")
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def plain_request(t, api: str) -> tuple[str, bytes, dict[str, str]]:
    """(url, body, headers) of one plain call to `t` in `api`: the same prompts as the streamed calls."""
    import orjson

    from bench.loadgen import chat_body, messages_body
    from bench.proxy_bench import responses_body

    if api == "chat":
        return t.urls["instant"], orjson.dumps(chat_body(t.models["instant"])), t.headers_for("instant")
    if api == "messages":
        return t.messages["instant"], orjson.dumps(messages_body(t.messages_models["instant"])), t.messages_headers
    url = t.urls["instant"].removesuffix("/chat/completions") + "/responses"
    return url, orjson.dumps(responses_body(t.models["instant"])), t.headers_for("instant")


def plain_call(sock: socket.socket, req: bytes) -> float | None:
    """Seconds to the last byte of one Content-Length answer on an open connection, None if closed."""
    t0 = time.perf_counter()
    sock.sendall(req)
    buf = b""
    want = None
    while want is None or len(buf) < want:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if want is None and b"\r\n\r\n" in buf:
            head, _, _ = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"plain call failed: {buf[:300]!r}")
            m = _CONTENT_LENGTH.search(head)
            if m is None:
                raise RuntimeError(f"plain answer without content-length: {head[:300]!r}")
            want = len(head) + 4 + int(m.group(1))
    return time.perf_counter() - t0


class _Conn:
    """One (target, api, kind): its request, its socket (reopened when the server closes it), its timings."""

    def __init__(self, t, api: str, kind: str) -> None:
        if kind == "plain":
            url, body, headers = plain_request(t, api)
            self.first, self.done = None, None
        else:
            url, body, headers, self.first, self.done = streaming.api_call(t, api)
        self.kind = kind
        self.url = urlsplit(url)
        self.req = streaming.request_bytes(url, body, headers)
        self.sock = self._open()
        self.ms: list[float] = []

    def _open(self) -> socket.socket:
        return streaming._connect(self.url.hostname or "127.0.0.1", self.url.port or 80)

    def once(self) -> float | None:
        if self.kind == "plain":
            return plain_call(self.sock, self.req)
        got = streaming.one_call(self.sock, self.req, self.first, self.done)
        return None if got is None else got[0]

    def calls(self, n: int, keep: bool = True) -> None:
        for _ in range(n):
            s = self.once()
            if s is None:  # closed by the server: reconnect, the call is not counted
                self.sock.close()
                self.sock = self._open()
                continue
            if keep:
                self.ms.append(s * 1000)


def run(targets: dict, rounds: int = 8, calls: int = 40, warmup: int = 30, apis=APIS, kinds=KINDS) -> dict:
    """targets: name -> bench Target, "direct" among them. Returns per kind, api: direct p50 and each other
    target's added p50 (ms), and the added share of chat's."""
    order = [(name, api, kind) for kind in kinds for api in apis for name in targets]
    conns = {k: _Conn(targets[k[0]], k[1], k[2]) for k in order}
    load0 = os.getloadavg()[0]
    try:
        for c in conns.values():
            c.calls(warmup, keep=False)
        for r in range(rounds):
            for k in order if r % 2 == 0 else order[::-1]:
                conns[k].calls(calls)
    finally:
        for c in conns.values():
            c.sock.close()
    out: dict = {"rounds": rounds, "calls": calls, "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    builds = [n for n in targets if n != "direct"]
    for kind in kinds:
        per: dict = {}
        for api in apis:
            direct = statistics.median(conns["direct", api, kind].ms)
            per[api] = {"direct_p50_ms": round(direct, 3)}
            for b in builds:
                per[api][f"{b}_added_p50_ms"] = round(statistics.median(conns[b, api, kind].ms) - direct, 3)
        for api in apis if "chat" in per else ():
            for b in builds:
                chat = per["chat"][f"{b}_added_p50_ms"]
                per[api][f"{b}_of_chat"] = round(per[api][f"{b}_added_p50_ms"] / chat, 3) if chat > 0 else None
        out[kind] = per
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m bench.side_by_side [--rounds 8 --calls 40]: mocks and one Tollway, the run above, JSON out."""
    import argparse
    import json

    from bench import targets

    ap = argparse.ArgumentParser(prog="python -m bench.side_by_side")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=40, help="calls per (round, api, kind, target)")
    args = ap.parse_args(argv)
    run_dir = targets.new_run_dir("side")
    mock_urls, mocks = targets.start_mocks(run_dir)
    tollway = None
    try:
        tollway = targets.start_tollway(run_dir, mock_urls)
        print(json.dumps(run({"direct": targets.direct(mock_urls), "tollway": tollway}, args.rounds, args.calls)))
    finally:
        if tollway is not None:
            tollway.stop()
        for p in reversed(mocks):
            p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
