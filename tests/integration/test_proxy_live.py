"""The proxy under a real uvicorn server: clients that leave mid-stream, the official `openai` SDK, and
rate limits shared by two proxy replicas through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from schemas.config import GatewayConfig, Limits
from services.proxy.app import create_app
from services.proxy.settings import ProxySettings
from tests.integration.test_proxy_gateway import CHAT, Gateway, make_config, record_events
from tests.support.stack import mock_upstream
from tests.support.waiting import eventually
from tollway.broker import free_port
from tollway.servers import bound_port, make_server, start_server, stop_server


@contextlib.asynccontextmanager
async def served_gateway(bootstrap: str, tmp: Path, config: GatewayConfig, **settings: Any) -> AsyncIterator[Gateway]:
    """The proxy app behind uvicorn on a free port; `client` talks real HTTP to it."""
    s = ProxySettings(data_dir=tmp, proxy_instance=f"live-{uuid.uuid4().hex[:8]}", **settings)
    app = create_app(s, config, bootstrap)
    srv = make_server(app, "127.0.0.1", 0)
    task = await start_server(srv, "proxy-under-test")
    gw = Gateway(app, httpx.AsyncClient(base_url=f"http://127.0.0.1:{bound_port(srv)}", timeout=10))
    record_events(gw)
    try:
        yield gw
    finally:
        await gw.client.aclose()
        await stop_server(srv, task)


async def mock_json(url: str, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(url.removesuffix("/v1") + path)).json()


@pytest.fixture
async def live(bootstrap, tmp_path):
    async with mock_upstream() as up:
        async with served_gateway(bootstrap, tmp_path, make_config({"a": up}, [{"provider": "a"}])) as gw:
            gw.upstream = up  # type: ignore[attr-defined]
            yield gw


# ---- client disconnects ----


async def test_client_leaving_mid_stream_stops_the_upstream_and_still_bills_once(live):
    secret, key = live.key()
    body = {**CHAT, "stream": True, "mock": {"stream_chunks": 200, "chunk_delay_ms": 20}}
    async with live.client.stream("POST", "/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {secret}"}) as r:  # fmt: skip
        got = 0
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                got += 1
            if got == 5:
                break  # leaving the block closes the connection mid-stream

    events = await eventually(lambda: asyncio.sleep(0, live.events_of(key.team_id)), lambda ev: len(ev) >= 1)
    e = events[0]
    assert e["client_disconnected"] is True and e["status"] == "ok" and e["stream"] is True
    assert e["usage_source"] == "estimated" and 3 <= e["completion_tokens"] < 100 and e["prompt_tokens"] > 0
    sent = (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"]
    await asyncio.sleep(0.3)  # 15 more chunk intervals: an upstream still being read would keep sending
    assert (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"] <= sent + 1 < 100
    assert len(live.events_of(key.team_id)) == 1  # exactly one event, however the stream ended


async def test_a_streamed_chat_call_is_recorded_before_the_client_holds_its_last_chunk(live):
    """A process killed just after the client has [DONE] must still bill the call: the event is in the spool
    before [DONE] goes out (the window tests/e2e/test_pipeline_kill9.py found for /v1/messages)."""
    secret, key = live.key()
    recorded_at_done = None
    async with live.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers={"authorization": f"Bearer {secret}"}) as r:  # fmt: skip
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                recorded_at_done = len(live.events_of(key.team_id))  # no await: what was there on arrival
    assert recorded_at_done == 1


async def test_client_leaving_before_the_first_byte_is_still_one_event(live):
    secret, key = live.key()
    body = {**CHAT, "stream": True, "mock": {"latency_ms": 300}}
    with pytest.raises(httpx.ReadTimeout):
        await live.client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"},
                               timeout=httpx.Timeout(10, read=0.1))  # fmt: skip
    events = await eventually(lambda: asyncio.sleep(0, live.events_of(key.team_id)), lambda ev: len(ev) >= 1)
    assert events[0]["client_disconnected"] is True and events[0]["prompt_tokens"] > 0
    await asyncio.sleep(0.1)
    assert len(live.events_of(key.team_id)) == 1


async def test_many_concurrent_streams_with_some_clients_leaving_emit_one_event_each(live):
    secret, key = live.key()

    async def one(i: int) -> None:
        body = {**CHAT, "stream": True, "mock": {"stream_chunks": 30, "chunk_delay_ms": 5}}
        async with live.client.stream("POST", "/v1/chat/completions", json=body,
                                      headers={"authorization": f"Bearer {secret}", "x-request-id": f"r{i}"}) as r:  # fmt: skip
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data:")
                if i % 2 and n == 3:
                    return

    await asyncio.gather(*(one(i) for i in range(20)))
    events = await eventually(lambda: asyncio.sleep(0, live.events_of(key.team_id)), lambda ev: len(ev) >= 20)
    await asyncio.sleep(0.1)
    assert sorted(e["request_id"] for e in live.events_of(key.team_id)) == sorted(f"r{i}" for i in range(20))
    gone = {e["request_id"]: e["client_disconnected"] for e in events}
    assert all(gone[f"r{i}"] is bool(i % 2) for i in range(20))


# ---- the official SDK ----


async def test_openai_sdk_streams_through_the_proxy_exactly(live):
    secret, key = live.key()
    client = openai.AsyncOpenAI(base_url=str(live.client.base_url) + "/v1", api_key=secret, max_retries=0)
    stream = await client.chat.completions.create(model="chat-alias", messages=CHAT["messages"], stream=True,
                                                  stream_options={"include_usage": True})  # fmt: skip
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16 and chunks[-1].usage.completion_tokens == 16
    assert chunks[0].choices[0].delta.role == "assistant"

    stream = await client.chat.completions.create(model="chat", messages=CHAT["messages"], stream=True)
    assert all(c.usage is None for c in [c async for c in stream])

    r = await client.chat.completions.create(model="chat", messages=CHAT["messages"])
    assert r.usage.completion_tokens == 16
    emb = await client.embeddings.create(model="embed", input=["one two"])
    assert len(emb.data[0].embedding) == 8
    events = live.events_of(key.team_id)
    assert [e["status"] for e in events] == ["ok"] * 4 and events[0]["completion_tokens"] == 16


async def test_openai_sdk_sees_rate_limits_and_broken_streams_as_its_own_errors(live):
    secret, _ = live.key(limits=Limits(rpm=1))
    client = openai.AsyncOpenAI(base_url=str(live.client.base_url) + "/v1", api_key=secret, max_retries=0)
    stream = await client.chat.completions.create(model="chat", messages=CHAT["messages"], stream=True,
                                                  extra_body={"mock": {"disconnect_after_chunks": 2}})  # fmt: skip
    with pytest.raises(openai.APIError, match="ended the stream early"):
        async for _ in stream:
            pass
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="chat", messages=CHAT["messages"])
    assert int(err.value.response.headers["retry-after"]) >= 1


# ---- rate limits shared through Redis ----


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port, no persistence; stopped at teardown. Missing binary = failure."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server is not installed: run `make system-deps` (apt-get install redis-server)")
    port = free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--logfile", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 10
    import socket

    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not start: {log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_two_replicas_share_key_and_team_limits_through_redis(bootstrap, tmp_path, redis_url):
    async with mock_upstream() as up:
        cfg = make_config({"a": up}, [{"provider": "a"}])
        async with served_gateway(bootstrap, tmp_path / "a", cfg, redis_url=redis_url) as a, \
                served_gateway(bootstrap, tmp_path / "b", cfg, redis_url=redis_url) as b:  # fmt: skip
            secret, key = a.key(limits=Limits(rpm=3))
            b.app.state.proxy.control.apply(key)
            statuses = [(await gw.chat(secret)).status_code for gw in (a, b, a, b, a)]
            assert statuses == [200, 200, 200, 429, 429]
            r = await b.chat(secret)
            assert r.headers["x-ratelimit-limit"] == "3" and int(r.headers["retry-after"]) >= 1

            team = f"team_{uuid.uuid4().hex[:8]}"
            k1, s1 = a.key(team, team_limits=Limits(tpm=600))
            k2, s2 = b.key(team, team_limits=Limits(tpm=600))
            a.app.state.proxy.control.apply(s2)
            b.app.state.proxy.control.apply(s1)
            assert (await a.chat(k1, {**CHAT, "max_tokens": 500})).status_code == 200
            # the reservation of 500 was settled to ~30 actual tokens, shared: the other replica sees room
            await eventually(
                lambda: b.chat(k2, {**CHAT, "max_tokens": 500}), lambda r: r.status_code == 200, timeout_s=5
            )


async def test_an_unreachable_redis_fails_open(bootstrap, tmp_path):
    async with mock_upstream() as up:
        cfg = make_config({"a": up}, [{"provider": "a"}])
        async with served_gateway(bootstrap, tmp_path, cfg, redis_url=f"redis://127.0.0.1:{free_port()}/0") as gw:
            secret, _ = gw.key(limits=Limits(rpm=1))
            assert [(await gw.chat(secret)).status_code for _ in range(3)] == [200, 200, 200]
            assert "tollway_ratelimit_store_errors_total" in (await gw.client.get("/metrics")).text
