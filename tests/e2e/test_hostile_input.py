"""Hostile input and slow clients against `tollway up --demo` as a real process (issue 17): header caps, read
deadlines, the connection cap, JSON depth, unbounded counts, client hang-ups, start-up errors and /docs; then a
bounded load part (loopback, ~20 s): 2,000 slow connections, huge headers and bodies while normal calls go on,
with the process's RSS growth measured and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.conftest import TOLLWAY, Stack, stack_env, start_stack, stop_stack

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
KEEPALIVE_S = 1.0
MAX_CONNECTIONS = 2_300  # above the load part's 2,000 slow connections + normal calls, below what the cap test opens
SLOW = 2_000
RSS_BOUND_MB = 150  # peak RSS growth of the whole `tollway up` process during the load part


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile")
    env = stack_env(tmp, TOLLWAY_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                    TOLLWAY_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S), TOLLWAY_HTTP_KEEPALIVE_TIMEOUT_S=str(KEEPALIVE_S),
                    TOLLWAY_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS))  # fmt: skip
    s = start_stack(tmp, env)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.new_key("hostile")["key"]


def addr(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def chat(stack: Stack, key: str, body: dict | bytes, timeout: float = 10) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(f"{stack.proxy_url}/chat/completions", content=content, timeout=timeout,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})  # fmt: skip


CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello"}]}


async def read_until_closed(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout_s)
            if not chunk:
                return data
            data += chunk
    return data


# ---- size caps and deadlines, on both servers ----


@pytest.mark.parametrize("server", ["proxy", "billing"])
def test_headers_over_the_cap_are_431_in_the_error_shape(stack: Stack, server: str) -> None:
    url = stack.proxy_url + "/models" if server == "proxy" else stack.billing_url + "/healthz"
    r = httpx.get(url, headers={"x-filler": "a" * 200_000}, timeout=10)
    assert r.status_code == 431, r.text
    assert r.json()["error"]["code"] == "request_header_fields_too_large"
    base = stack.proxy_url.removesuffix("/v1") if server == "proxy" else stack.billing_url
    assert httpx.get(base + "/healthz", timeout=10).status_code == 200  # and it still serves everyone else


@pytest.mark.parametrize("server", ["proxy", "billing"])
async def test_dripped_headers_are_cut_with_408_after_the_header_deadline(stack: Stack, server: str) -> None:
    host, port = addr(stack.proxy_url if server == "proxy" else stack.billing_url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
    t0 = time.monotonic()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(0.2)
                writer.write(b"a")
                await writer.drain()

    dripper = asyncio.create_task(drip())
    data = await read_until_closed(reader, HEADER_TIMEOUT_S + 5)
    took = time.monotonic() - t0
    dripper.cancel()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_header_timeout" in data
    assert HEADER_TIMEOUT_S - 0.2 <= took <= HEADER_TIMEOUT_S + 1.5, took


async def test_idle_and_silent_connections_are_closed(stack: Stack) -> None:
    host, port = addr(stack.billing_url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    t0 = time.monotonic()
    data = await read_until_closed(reader, KEEPALIVE_S + 5)  # answered, then held open only while idle < keep-alive
    assert data.startswith(b"HTTP/1.1 200") and KEEPALIVE_S - 0.2 <= time.monotonic() - t0 <= KEEPALIVE_S + 1.5
    writer.close()
    reader, writer = await asyncio.open_connection(host, port)  # connects and never sends a byte
    t0 = time.monotonic()
    assert await read_until_closed(reader, HEADER_TIMEOUT_S + 5) == b""
    assert HEADER_TIMEOUT_S - 0.2 <= time.monotonic() - t0 <= HEADER_TIMEOUT_S + 1.5
    writer.close()


async def test_a_dripped_body_is_cut_after_the_body_deadline_and_billed_as_a_hang_up(stack: Stack, key: str) -> None:
    host, port = addr(stack.proxy_url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                 + b"\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"model\"")  # fmt: skip
    t0 = time.monotonic()
    data = await read_until_closed(reader, BODY_TIMEOUT_S + 5)
    took = time.monotonic() - t0
    writer.close()
    assert data.startswith(b"HTTP/1.1 408") and b"request_body_timeout" in data, data[:200]
    assert BODY_TIMEOUT_S - 0.2 <= took <= BODY_TIMEOUT_S + 1.5, took
    deadline = time.monotonic() + 5
    while not any(e.get("event") == "client_hung_up" for e in stack.log_events()):  # the proxy's 499 event's line
        assert time.monotonic() < deadline, "no client_hung_up line after a body timeout"
        await asyncio.sleep(0.1)


async def test_a_client_hanging_up_mid_upload_is_an_info_line_not_a_traceback(stack: Stack, key: str) -> None:
    host, port = addr(stack.proxy_url)
    for _ in range(5):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                     + b"\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n" + b" " * 5000)  # fmt: skip
        await writer.drain()
        writer.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [e for e in stack.log_events() if e.get("event") == "client_hung_up"]
        if len(lines) >= 5:
            break
        await asyncio.sleep(0.1)
    assert len(lines) >= 5 and all(e["level"] == "info" for e in lines), lines
    text = stack.log_path.read_text()
    assert "Traceback" not in text and "proxy_internal_error" not in text


def test_more_connections_than_the_cap_get_a_clear_503(stack: Stack) -> None:
    host, port = addr(stack.billing_url)
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 5):
            held.append(socket.create_connection((host, port)))
        time.sleep(0.2)
        r = httpx.get(stack.billing_url + "/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections", r.text
        assert r.headers["connection"] == "close"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while httpx.get(stack.billing_url + "/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "billing did not recover after the connections closed"
        time.sleep(0.1)


# ---- request bodies ----


@pytest.mark.parametrize("depth", [300, 1024])
def test_deeply_nested_json_is_a_400_naming_the_depth_limit(stack: Stack, key: str, depth: int) -> None:
    body = b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * (depth - 1)
    body += b"]" * (depth - 1) + b"}"
    r = chat(stack, key, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "json_too_deep" and "254 levels" in r.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [("n", 2**62), ("n", 0), ("max_tokens", 2**62),
                                              ("max_completion_tokens", 10**9), ("top_logprobs", 1000)])  # fmt: skip
def test_counts_out_of_range_are_a_400_naming_the_field(stack: Stack, key: str, field: str, value: int) -> None:
    r = chat(stack, key, {**CHAT, field: value})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_value"


def test_no_input_makes_a_500_or_names_an_internal(stack: Stack, key: str) -> None:
    bodies = [b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "' + b"\\ud800" + b'"}]}',
              b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "n": 1e400}',
              b'{"model": ["gpt-4.1"], "messages": [{"role": "user", "content": "hi"}]}',
              b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": {"a": [1, {"b": null}]}}]}',
              b'{"model": "gpt-4.1", "messages": [{"role": "user"}], "stream_options": {"include_usage": 7}}']  # fmt: skip
    for body in bodies:
        r = chat(stack, key, body)
        assert r.status_code < 500, (body, r.status_code, r.text)
        assert "Error)" not in r.text and "Traceback" not in r.text


# ---- start-up errors, /docs ----


def test_bad_settings_and_a_taken_port_are_one_line_and_exit_2(stack: Stack) -> None:
    for extra in ({"TOLLWAY_HTTP_MAX_HEADER_BYTES": "lots"}, {"TOLLWAY_MOCK_PORT": "eighty"},
                  {"TOLLWAY_MOCK_PORT": str(addr(stack.proxy_url)[1])}):  # fmt: skip
        out = subprocess.run([TOLLWAY, "mock-upstream"], env={**stack.env, **extra}, capture_output=True, text=True,
                             timeout=30)  # fmt: skip
        assert out.returncode == 2, (extra, out.returncode, out.stderr)
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("tollway: "), out.stderr
        assert "TOLLWAY_" in out.stderr  # names what to change
        assert "Traceback" not in out.stderr


def test_docs_are_off_on_both_servers(stack: Stack) -> None:
    for base in (stack.proxy_url.removesuffix("/v1"), stack.billing_url):
        for path in ("/docs", "/redoc"):
            assert httpx.get(base + path).status_code == 404, base + path


# ---- the load part ----


async def _slow_connection(host: str, port: int, kind: int, key: bytes, closed: list[float], stop: asyncio.Event,
                           t0: float) -> None:  # fmt: skip
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    if kind == 0:  # headers, dripped
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-drip: ")
    else:  # headers whole, body dripped
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key
                     + b"\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{")  # fmt: skip
    read = asyncio.ensure_future(reader.read())
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait([read], timeout=0.5)
            if done:
                closed.append(time.monotonic() - t0)
                return
            with contextlib.suppress(ConnectionError):
                writer.write(b"a")
    finally:
        read.cancel()
        writer.close()


def _blast(host: str, port: int, head: bytes, size: int, chunked: bool) -> bytes:
    """Send `head` then up to `size` bytes fast; return what the server answered (it may cut us off)."""
    s = socket.create_connection((host, port))
    s.settimeout(15)
    got = b""
    try:
        s.sendall(head)
        block = b"a" * 65536
        sent = 0
        while sent < size:
            s.sendall((b"10000\r\n" + block + b"\r\n") if chunked else block)
            sent += len(block)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            got += chunk
    s.close()
    return got


async def test_load_2000_slow_connections_and_huge_inputs_keep_the_stack_answering(stack: Stack, key: str) -> None:
    host, port = addr(stack.proxy_url)
    pid = stack.proc.pid
    assert chat(stack, key, CHAT).status_code == 200
    rss0 = rss_mb(pid)
    peak = rss0
    closed: list[float] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    slow = [asyncio.create_task(_slow_connection(host, port, i % 2, key.encode(), closed, stop, t0))
            for i in range(SLOW)]  # fmt: skip
    await asyncio.sleep(0.5)
    auth = f"authorization: Bearer {key}\r\n".encode()
    big_header = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + auth + b"x-big: "
    big_body = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + auth + b"content-type: application/json\r\n"
    blasts = [asyncio.to_thread(_blast, host, port, big_header, 50 * 1024 * 1024, False) for _ in range(8)]
    blasts += [asyncio.to_thread(_blast, host, port, big_body + b"content-length: 209715200\r\n\r\n", 8 << 20, False)
               for _ in range(4)]  # fmt: skip
    blasts += [asyncio.to_thread(_blast, host, port, big_body + b"transfer-encoding: chunked\r\n\r\n", 20 << 20, True)
               for _ in range(4)]  # fmt: skip
    blast_task = asyncio.gather(*blasts)
    latencies = []
    async with httpx.AsyncClient(timeout=10) as c:
        h = {"authorization": f"Bearer {key}"}
        while not blast_task.done() or len(latencies) < 20:
            t = time.monotonic()
            r = await c.post(f"{stack.proxy_url}/chat/completions", json=CHAT, headers=h)
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - t)
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)
    answers = await blast_task
    # the slow ones are cut by the deadlines: wait for all of them (bounded)
    deadline = time.monotonic() + HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 8
    while len(closed) < SLOW and time.monotonic() < deadline:
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*slow)
    rss1 = rss_mb(pid)
    latencies.sort()
    cut = sorted(closed)
    print(f"\nload: {SLOW} slow connections, {len(cut)} cut by the server, last at {cut[-1] if cut else 0:.1f} s; "
          f"normal calls during it: {len(latencies)}, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; RSS {rss0:.0f} MB -> peak {peak:.0f} MB -> {rss1:.0f} MB after "
          f"(growth {peak - rss0:.0f} MB, bound {RSS_BOUND_MB} MB)")  # fmt: skip
    statuses = [a.split(b" ", 2)[1] if a.startswith(b"HTTP/1.1") else a[:40] for a in answers]
    print(f"huge inputs answered: {statuses}")
    assert len(cut) == SLOW, f"only {len(cut)} of {SLOW} slow connections were cut"
    assert all(s == b"431" for s in statuses[:8]), statuses
    assert all(s == b"413" for s in statuses[8:]), statuses
    assert peak - rss0 < RSS_BOUND_MB
    assert chat(stack, key, CHAT).status_code == 200
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(stack.proxy_url.removesuffix("/v1") + "/metrics")).text
    refused = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("tollway_http_refused_total{")}  # fmt: skip
    print(f"tollway_http_refused_total in this process: {refused}")
    assert refused["request_header_timeout"] >= SLOW // 2 and refused["request_body_timeout"] >= SLOW // 2
