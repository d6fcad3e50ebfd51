"""The proxy (real uvicorn, real broker) against hostile upstreams and hostile bodies (issue 17): answers past
their bounds, provider messages carrying secrets, duplicate keys, client hang-ups, internal errors, and a full
usage spool. The hostile upstream is a raw asyncio server in this process: it answers what the body's
`mock.hostile` asks for and records what it was sent."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.proxy.spool import Spool
from tests.integration.test_proxy_gateway import CHAT, make_config
from tests.integration.test_proxy_live import served_gateway
from tollway.broker import free_port


def completion(model: str) -> bytes:
    return orjson.dumps({"id": "c1", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})  # fmt: skip


def chunk(content: str, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": content}, "finish_reason": finish}]}) + b"\n\n"  # fmt: skip


BOMB = gzip.compress(b'{"pad": "' + b"a" * (40 << 20) + b'"}', 6)  # ~40 KB that inflates to 40 MB


class HostileUpstream:
    def __init__(self) -> None:
        self.received: list[list[tuple[str, Any]]] = []  # each body's top-level pairs, duplicates kept, in order

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))  # fmt: skip
                raw = await reader.readexactly(length)
                pairs = json.loads(raw, object_pairs_hook=lambda p: p)
                self.received.append(pairs)
                body = json.loads(raw)
                how = (body.get("mock") or {}).get("hostile", "ok") if isinstance(body.get("mock"), dict) else "ok"
                first_model = next(v for k, v in pairs if k == "model")
                await self.answer(writer, how, first_model, body.get("stream") is True)
                await writer.drain()
                if how != "ok":
                    break
        writer.close()

    async def answer(self, w: asyncio.StreamWriter, how: str, model: str, stream: bool) -> None:
        def plain(status: int, body: bytes, *extra: bytes) -> None:
            w.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (status, len(body))
                    + b"".join(e + b"\r\n" for e in extra) + b"\r\n" + body)  # fmt: skip

        if how == "ok" and not stream:
            plain(200, completion(model))
        elif how == "huge":
            plain(200, b'{"pad": "' + b"a" * (3 << 20) + b'"}')
        elif how == "gzip_bomb":
            plain(200, BOMB, b"content-encoding: gzip")
        elif how == "auth401":
            plain(401, orjson.dumps({"error": {"message": "Incorrect API key provided: sk-proj-ab12**********"
                                               "**************wxyz. You can find your API key at ..."}}))  # fmt: skip
        elif how == "bad400":
            plain(400, orjson.dumps({"error": {"message": "This model's maximum context length is 8192 tokens "
                                               "(org org-AbCdEf0123456789xyzXYZ01, key sk-live-abcdef)."}}))  # fmt: skip
        elif stream:  # SSE until the connection closes
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            if how == "sse_long_first":
                w.write(b"data: " + b"a" * (200 << 10))
            else:
                w.write(chunk("Hello"))
                await w.drain()
                w.write(
                    b"data: " + b"a" * (200 << 10)
                    if how == "sse_long_line"
                    else chunk("!", "stop") + b"data: [DONE]\n\n"
                )
        else:
            plain(500, b"{}")


@contextlib.asynccontextmanager
async def hostile_upstream() -> AsyncIterator[tuple[str, HostileUpstream]]:
    up = HostileUpstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", up
    finally:
        server.close()


LIMITS = {"upstream_max_body_bytes": 1 << 20, "upstream_max_sse_line_bytes": 64 << 10}


@pytest.fixture
async def hostile(bootstrap, tmp_path):
    async with hostile_upstream() as (url, up):
        config = make_config({"h": url}, [{"provider": "h"}], model_extra={"max_output_tokens": 4096})
        async with served_gateway(bootstrap, tmp_path, config, **LIMITS) as gw:
            gw.upstream = up  # type: ignore[attr-defined]
            yield gw


async def call(gw: Any, secret: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await gw.client.post("/v1/chat/completions", content=content,
                                headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})  # fmt: skip


async def test_duplicate_model_keys_the_upstream_serves_what_is_billed(hostile):
    secret, key = hostile.key()
    raw = b'{"model": "other", "messages": [{"role": "user", "content": "hi"}], "model": "chat"}'
    r = await call(hostile, secret, raw)
    assert r.status_code == 200, r.text
    (e,) = hostile.events_of(key.team_id)
    sent = hostile.upstream.received[-1]
    models = [v for k, v in sent if k == "model"]
    assert models == [e["served_model"]] == ["chat"], sent  # one key, the billed one: no reader can pick another


@pytest.mark.parametrize("how", ["huge", "gzip_bomb"])
async def test_an_upstream_answer_past_the_bound_is_a_502_with_an_event(hostile, how):
    secret, key = hostile.key()
    r = await call(hostile, secret, {**CHAT, "mock": {"hostile": how}})
    assert r.status_code == 502, r.text[:300]
    assert r.json()["error"]["code"] == "upstream_response_too_large"
    (e,) = hostile.events_of(key.team_id)
    assert e["http_status"] == 502 and e["error_code"] == "upstream_response_too_large" and e["attempts"] == 1


async def test_an_sse_line_past_the_bound_ends_the_stream_with_an_error_and_an_event(hostile):
    secret, key = hostile.key()
    body = {**CHAT, "stream": True, "mock": {"hostile": "sse_long_line"}}
    async with hostile.client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {secret}"}) as r:  # fmt: skip
        lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
    assert r.status_code == 200 and len(lines) == 2, lines
    assert "upstream_response_too_large" in lines[-1] and len(lines[-1]) < 1000
    (e,) = hostile.events_of(key.team_id)
    assert e["status"] == "error" and e["error_code"] == "upstream_response_too_large"


async def test_an_sse_line_past_the_bound_before_the_first_event_is_a_502(hostile):
    secret, key = hostile.key()
    r = await call(hostile, secret, {**CHAT, "stream": True, "mock": {"hostile": "sse_long_first"}})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_response_too_large", r.text[:300]
    (e,) = hostile.events_of(key.team_id)
    assert e["http_status"] == 502


async def test_a_provider_401_does_not_show_the_tenant_any_of_the_operators_key(hostile):
    secret, _ = hostile.key()
    r = await call(hostile, secret, {**CHAT, "mock": {"hostile": "auth401"}})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rejected"
    assert "sk-" not in r.text and "****" not in r.text and "wxyz" not in r.text and "Incorrect" not in r.text


async def test_a_provider_400_keeps_its_reason_without_key_like_tokens(hostile):
    secret, _ = hostile.key()
    r = await call(hostile, secret, {**CHAT, "mock": {"hostile": "bad400"}})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "maximum context length is 8192 tokens" in msg
    assert "sk-live" not in msg and "AbCdEf0123456789" not in msg


async def test_max_tokens_above_the_models_stated_maximum_is_a_400(hostile):
    secret, _key = hostile.key()
    assert (await call(hostile, secret, {**CHAT, "max_tokens": 4096})).status_code == 200
    r = await call(hostile, secret, {**CHAT, "max_tokens": 4097})
    assert r.status_code == 400 and "4096" in r.json()["error"]["message"], r.text


async def test_a_client_hanging_up_mid_upload_is_a_499_event(hostile):
    secret, key = hostile.key()
    port = int(str(hostile.client.base_url).rsplit(":", 1)[1].strip("/"))
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + secret.encode()
                 + b"\r\ncontent-length: 50000\r\n\r\n" + b" " * 1000)  # fmt: skip
    await writer.drain()
    writer.close()
    for _ in range(200):
        if hostile.events_of(key.team_id):
            break
        await asyncio.sleep(0.01)
    (e,) = hostile.events_of(key.team_id)
    assert e["http_status"] == 499 and e["client_disconnected"] is True and e["error_code"] == "client_disconnected"


async def test_an_internal_error_answers_500_without_naming_the_exception(hostile):
    secret, _key = hostile.key()
    handler = hostile.app.state.handler

    def broken(*_: Any) -> Any:
        raise TypeError("a bug in the cache path")

    handler.cache_use = broken
    r = await call(hostile, secret, CHAT)
    assert r.status_code == 500
    assert "TypeError" not in r.text and "cache" not in r.text and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] in r.json()["error"]["message"]


# ---- spool full ----


async def test_a_full_spool_refuses_new_calls_and_every_served_call_is_on_disk(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TOLLWAY_SPOOL_MAX_BYTES", str(64 * 1024))
    dead = f"127.0.0.1:{free_port()}"  # no broker: every event stays in the spool
    async with hostile_upstream() as (url, _):
        async with served_gateway(dead, tmp_path, make_config({"h": url}, [{"provider": "h"}])) as gw:
            secret, key = gw.key()
            statuses: list[int] = []
            first_not_ready = first_refused = None
            for i in range(400):
                r = await call(gw, secret, CHAT)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "usage_unrecordable", r.text
                    assert "usage could not be recorded" in r.json()["error"]["message"].lower()
                    first_refused = i if first_refused is None else first_refused
                # (the control view never catches up without a broker: the spool's own check is what matters)
                spool_ok = (await gw.client.get("/readyz")).json()["checks"]["usage_spool"]
                if first_not_ready is None and not spool_ok:
                    first_not_ready = i
            emitter = gw.app.state.emitter
            spool_dir = emitter.spool.dir
            refused_by_spool = emitter.refused
    served = statuses.count(200)
    assert set(statuses) == {200, 503} and served < 400, statuses
    assert first_not_ready is not None and first_refused is not None and first_not_ready < first_refused
    assert refused_by_spool == 0  # no event of a served call was turned away
    spool = Spool(spool_dir)
    ok = [orjson.loads(p) for p, _ in spool.iter_from(spool.acked)]
    spool.close()
    assert sum(1 for ev in ok if ev["status"] == "ok" and ev["team_id"] == key.team_id) == served
    print(
        f"\nspool full: {served} of 400 served (all on disk), {statuses.count(503)} refused with 503; "
        f"readiness (usage_spool) failed at call {first_not_ready}, refusals began at call {first_refused}"
    )
