"""/v1/responses through the real proxy app (under uvicorn) against real mock upstreams: plain and streamed
creates billed in every dimension from the final response, the stream's edge cases, the cache rule for stored
responses, and follow-ups routed across two proxy replicas that share nothing but the broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from schemas.config import GatewayConfig, parse_config
from tests.integration.test_proxy_gateway import FAST_RETRY, Gateway
from tests.integration.test_proxy_live import mock_json, served_gateway
from tests.support.stack import mock_upstream, publish_key
from tests.support.waiting import eventually
from tollway.servers import serving

SECRET = "s3cret-shared-by-both-replicas"
HELLO = {"model": "chat", "input": "Hello there, how are you?"}


def config(providers: dict[str, str]) -> GatewayConfig:
    names = list(providers)
    return parse_config({
        "providers": {n: {"base_url": url, "timeout_s": 5} for n, url in providers.items()},
        "models": {
            "chat": {"routes": [{"provider": n} for n in names], "max_output_tokens": 4096,
                     "prices": [{"input": "1", "output": "2", "cached_input": "0.5"}]},
            "solo": {"routes": [{"provider": names[-1]}], "prices": [{"input": "1", "output": "2"}]},
        },
        "retry": FAST_RETRY,
    })  # fmt: skip


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def sse(r: httpx.Response) -> list[dict[str, Any]]:
    """The typed events of a streamed answer, each with its `event:` name checked against its type."""
    events, name = [], None
    async for line in r.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = orjson.loads(line[5:].strip())
            assert data["type"] == name
            events.append(data)
    return events


async def settled(gw: Gateway, team: str, n: int) -> list[dict[str, Any]]:
    return await eventually(lambda: asyncio.sleep(0, gw.events_of(team)), lambda ev: len(ev) >= n)


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[str, str]]:
    async with mock_upstream() as a, mock_upstream() as b:
        yield a, b


@pytest.fixture
async def live(bootstrap, tmp_path, upstreams):
    async with served_gateway(bootstrap, tmp_path, config({"a": upstreams[0]}),
                              responses_id_secret=SECRET) as gw:  # fmt: skip
        gw.upstream = upstreams[0]  # type: ignore[attr-defined]
        yield gw


# ---- create, plain and streamed ----


async def test_a_plain_create_is_billed_in_every_dimension_and_handed_a_tollway_id(live):
    secret, key = live.key()
    mock = {"cached_tokens": 6, "reasoning_tokens": 5, "web_search_requests": 2, "service_tier": "flex"}
    r = await live.client.post("/v1/responses", json={**HELLO, "mock": mock}, headers=auth(secret))
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"].startswith("resp_tw1.") and resp["object"] == "response"
    u = resp["usage"]
    (e,) = live.events_of(key.team_id)
    assert e["endpoint"] == "responses" and e["status"] == "ok" and e["usage_source"] == "provider"
    assert e["prompt_tokens"] == u["input_tokens"] and e["cached_tokens"] == u["input_tokens_details"]["cached_tokens"]
    assert (
        e["completion_tokens"] == u["output_tokens"]
        and e["reasoning_tokens"] == 5 == (u["output_tokens_details"]["reasoning_tokens"])
    )
    assert e["cached_tokens"] == 6 and e["web_search_requests"] == 2 and e["service_tier"] == "flex"
    assert e["served_model"] == "chat" and e["provider"] == "a" and e["stream"] is False


async def test_a_streamed_create_passes_typed_events_through_and_bills_from_response_completed(live):
    secret, key = live.key()
    body = {**HELLO, "stream": True, "reasoning": {"effort": "low"}, "mock": {"cached_tokens": 4}}
    async with live.client.stream("POST", "/v1/responses", json=body, headers=auth(secret)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = await sse(r)
    kinds = [ev["type"] for ev in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [ev["sequence_number"] for ev in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["id"].startswith("resp_tw1.")
    text = "".join(ev["delta"] for ev in events if ev["type"] == "response.output_text.delta")
    assert final["output"][-1]["content"][0]["text"] == text
    (e,) = await settled(live, key.team_id, 1)
    u = final["usage"]
    assert e["stream"] is True and e["status"] == "ok" and e["usage_source"] == "provider"
    assert (e["prompt_tokens"], e["completion_tokens"], e["cached_tokens"], e["reasoning_tokens"]) == (
        u["input_tokens"], u["output_tokens"], 4, u["output_tokens_details"]["reasoning_tokens"])  # fmt: skip
    assert e["reasoning_tokens"] == 8 and e["ttft_ms"] is not None and 0 < e["ttft_ms"] <= e["latency_ms"]


async def test_a_streamed_create_is_recorded_before_the_client_holds_response_completed(live):
    """A process killed just after the client has the final event must still bill the call."""
    secret, key = live.key()
    recorded_at_end = None
    async with live.client.stream("POST", "/v1/responses", json={**HELLO, "stream": True},
                                  headers=auth(secret)) as r:  # fmt: skip
        async for line in r.aiter_lines():
            if '"type":"response.completed"' in line:
                recorded_at_end = len(live.events_of(key.team_id))  # no await: what was there on arrival
    assert recorded_at_end == 1


async def test_an_upstream_cut_before_response_completed_is_a_broken_stream_billed_on_an_estimate(live):
    secret, key = live.key()
    body = {**HELLO, "stream": True, "mock": {"stream_chunks": 20, "disconnect_after_chunks": 3}}
    async with live.client.stream("POST", "/v1/responses", json=body, headers=auth(secret)) as r:
        events = await sse(r)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_stream_broken"
    assert events[-1]["error"]["code"] == "upstream_stream_broken"  # what the openai SDK raises on
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1
    (e,) = await settled(live, key.team_id, 1)
    assert e["status"] == "error" and e["error_code"] == "upstream_stream_broken"
    assert e["usage_source"] == "estimated" and e["prompt_tokens"] > 0 and e["completion_tokens"] >= 3


async def test_a_client_hanging_up_mid_stream_is_billed_once_and_marked(live):
    secret, key = live.key()
    body = {**HELLO, "stream": True, "mock": {"stream_chunks": 200, "chunk_delay_ms": 20}}
    async with live.client.stream("POST", "/v1/responses", json=body, headers=auth(secret)) as r:
        deltas = 0
        async for line in r.aiter_lines():
            deltas += line.startswith("event: response.output_text.delta")
            if deltas == 5:
                break
    (e,) = await settled(live, key.team_id, 1)
    assert e["client_disconnected"] is True and e["status"] == "ok" and e["usage_source"] == "estimated"
    assert 3 <= e["completion_tokens"] < 100 and e["prompt_tokens"] > 0
    sent = (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"]
    await asyncio.sleep(0.3)
    assert (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"] <= sent + 1 < 100
    await asyncio.sleep(0.1)
    assert len(live.events_of(key.team_id)) == 1


async def test_missing_usage_is_estimated_and_an_explicit_zero_stays_zero(live):
    secret, key = live.key()
    r = await live.client.post("/v1/responses", json={**HELLO, "mock": {"usage": False}}, headers=auth(secret))
    assert r.status_code == 200 and r.json()["usage"] is None
    r = await live.client.post("/v1/responses", json={**HELLO, "mock": {"stream_chunks": 0, "input_tokens": 0}},
                               headers=auth(secret))  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 0
    estimated, zero = live.events_of(key.team_id)
    assert estimated["usage_source"] == "estimated" and estimated["prompt_tokens"] > 0
    assert estimated["completion_tokens"] > 0
    assert zero["usage_source"] == "provider" and zero["prompt_tokens"] == 0 == zero["completion_tokens"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "chat"}, "missing_required_parameter"),
        ({"model": "chat", "input": 5}, "invalid_input"),
        ({"model": "chat", "input": ["x"]}, "invalid_input"),
        ({**HELLO, "stream": "yes"}, "invalid_type"),
        ({**HELLO, "max_output_tokens": 0}, "invalid_value"),
        ({**HELLO, "max_output_tokens": 5000}, "invalid_value"),  # above the model's max_output_tokens
        ({**HELLO, "background": True}, "unsupported_parameter"),
        ({**HELLO, "instructions": ["x"]}, "invalid_type"),
        ({**HELLO, "previous_response_id": "resp_forged"}, "previous_response_not_found"),
        ({**HELLO, "conversation": "conv_of_someone"}, "unsupported_parameter"),
        ({"model": "chat", "input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_parameter"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors_and_an_event(live, body, code):
    secret, key = live.key()
    r = await live.client.post("/v1/responses", json=body, headers=auth(secret))
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    (e,) = live.events_of(key.team_id)
    assert e["status"] == "error" and e["error_code"] == code and e["prompt_tokens"] == 0


async def test_a_create_carries_its_end_user_and_tags_and_a_bad_tag_is_refused(live):
    """The attribution rules of chat (services/proxy/attribution.py) hold on /v1/responses and its follow-ups."""
    secret, key = live.key()
    headers = {**auth(secret), "x-tollway-tags": "env=prod"}
    body = {**HELLO, "safety_identifier": "user-7", "metadata": {"project": "apollo"}}
    r = await live.client.post("/v1/responses", json=body, headers=headers)
    assert r.status_code == 200, r.text
    got = await live.client.get(f"/v1/responses/{r.json()['id']}", headers=headers)
    assert got.status_code == 200, got.text
    bad = await live.client.post("/v1/responses", json={**HELLO, "metadata": {"bad tag": "x"}}, headers=auth(secret))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_tag", bad.text
    create, follow, refused = await settled(live, key.team_id, 3)
    assert create["end_user"] == "user-7" and create["metadata"] == {"project": "apollo", "env": "prod"}
    assert follow["endpoint"] == "responses.get" and follow["metadata"] == {"env": "prod"}
    assert refused["status"] == "error" and refused["error_code"] == "invalid_tag"


async def test_only_unstored_calls_that_opt_in_are_cached(live):
    secret, key = live.key()
    h = {**auth(secret), "x-tollway-cache": "true"}
    unstored = {**HELLO, "store": False, "mock": {"cached_tokens": 3}}
    first = await live.client.post("/v1/responses", json=unstored, headers=h)
    second = await live.client.post("/v1/responses", json=unstored, headers=h)
    assert second.headers["x-tollway-cache"] == "hit" and second.json() == first.json()
    stored = [await live.client.post("/v1/responses", json=HELLO, headers=h) for _ in range(2)]
    assert "x-tollway-cache" not in stored[1].headers and stored[0].json()["id"] != stored[1].json()["id"]
    ev = live.events_of(key.team_id)
    assert [e["status"] for e in ev] == ["ok", "cached", "ok", "ok"]
    assert ev[1]["prompt_tokens"] == ev[0]["prompt_tokens"] and ev[1]["cached_tokens"] == 3 == ev[0]["cached_tokens"]


# ---- follow-ups across replicas ----


@contextlib.asynccontextmanager
async def replicas(bootstrap: str, tmp: Path, upstreams: tuple[str, str]) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two proxy replicas, each its own app, data dir and event sequence, the same config and id secret."""
    cfg = config({"a": upstreams[0], "b": upstreams[1]})
    async with served_gateway(bootstrap, tmp / "A", cfg, responses_id_secret=SECRET) as a:
        async with served_gateway(bootstrap, tmp / "B", cfg, responses_id_secret=SECRET) as b:
            yield a, b


async def broker_key(bootstrap: str, team: str, *gws: Gateway) -> str:
    """A key as billing makes it: on the control topic, which each replica reads on its own."""
    secret, _ = await publish_key(bootstrap, team)
    for gw in gws:
        await eventually(lambda gw=gw: gw.client.get("/v1/models", headers=auth(secret)),
                         lambda r: r.status_code == 200)  # fmt: skip
    return secret


async def test_follow_ups_reach_the_creating_provider_from_another_replica_and_no_other_team(
    bootstrap, tmp_path, upstreams
):
    async with replicas(bootstrap, tmp_path, upstreams) as (a, b):
        team, other_team = f"team_{uuid.uuid4().hex[:8]}", f"team_{uuid.uuid4().hex[:8]}"
        secret = await broker_key(bootstrap, team, a, b)
        other = await broker_key(bootstrap, other_team, a, b)
        made = await a.client.post("/v1/responses", json={**HELLO, "model": "solo"}, headers=auth(secret))
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        served_b = (await mock_json(upstreams[1], "/mock/stats"))["requests_served"]

        got = await b.client.get(f"/v1/responses/{rid}", headers=auth(secret))
        assert got.status_code == 200 and got.json()["id"] == rid
        assert got.json()["output"] == made.json()["output"]
        items = await b.client.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"}, headers=auth(secret))
        assert items.status_code == 200 and items.json()["data"][0]["content"][0]["text"] == HELLO["input"]
        # provider b holds it (provider a never saw it): both follow-ups went there
        assert (await mock_json(upstreams[1], "/mock/stats"))["requests_served"] == served_b + 2

        for path in (f"/v1/responses/{rid}", f"/v1/responses/{rid}/input_items"):
            stolen = await b.client.get(path, headers=auth(other))
            assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "not_found"
        assert (await b.client.delete(f"/v1/responses/{rid}", headers=auth(other))).status_code == 404
        chained = await b.client.post("/v1/responses", json={**HELLO, "previous_response_id": rid},
                                      headers=auth(other))  # fmt: skip
        assert chained.status_code == 404 and chained.json()["error"]["code"] == "previous_response_not_found"
        assert (await mock_json(upstreams[1], "/mock/stats"))["requests_served"] == served_b + 2  # none went up

        # chained creates on replica B, for a model routed to a and b, all reach b (which holds the context)
        for _ in range(4):
            r = await b.client.post("/v1/responses", json={**HELLO, "previous_response_id": rid},
                                    headers=auth(secret))  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["previous_response_id"] == rid and r.json()["id"].startswith("resp_tw1.")
        cancel = await b.client.post(f"/v1/responses/{rid}/cancel", headers=auth(secret))
        assert cancel.status_code == 400 and "background" in cancel.json()["error"]["message"]  # the provider's word
        gone = await b.client.delete(f"/v1/responses/{rid}", headers=auth(secret))
        assert gone.status_code == 200 and gone.json() == {"id": rid, "object": "response.deleted", "deleted": True}
        assert (await a.client.get(f"/v1/responses/{rid}", headers=auth(secret))).status_code == 404

        ev_b = [e for e in b.events if e["team_id"] == team]
        assert [e["endpoint"] for e in ev_b] == ["responses.get", "responses.input_items", *["responses"] * 4,
                                                 "responses.cancel", "responses.delete"]  # fmt: skip
        assert all(e["provider"] == "b" for e in ev_b)
        for e in ev_b:
            if e["endpoint"] != "responses":
                assert e["prompt_tokens"] == e["completion_tokens"] == 0 and e["usage_source"] == "provider"
        assert [e["status"] for e in ev_b if e["endpoint"] != "responses"] == ["ok", "ok", "error", "ok"]
        ev_a = [e for e in a.events if e["team_id"] == team]
        assert [(e["endpoint"], e["status"], e["http_status"]) for e in ev_a] == [
            ("responses", "ok", 200), ("responses.get", "error", 404)]  # fmt: skip
        stolen_ev = [e for e in b.events if e["team_id"] == other_team]
        assert len(stolen_ev) == 4 and all(e["http_status"] == 404 and e["provider"] == "" for e in stolen_ev)


async def test_a_full_spool_refuses_follow_ups_too(bootstrap, tmp_path, upstreams, monkeypatch):
    async with served_gateway(bootstrap, tmp_path / "ok", config({"a": upstreams[0]}),
                              responses_id_secret=SECRET) as gw:  # fmt: skip
        secret, key = gw.key()
        rid = (await gw.client.post("/v1/responses", json=HELLO, headers=auth(secret))).json()["id"]
    monkeypatch.setenv("TOLLWAY_SPOOL_REFUSE_RATIO", "0")  # the spool counts as full from the start
    async with served_gateway(bootstrap, tmp_path / "full", config({"a": upstreams[0]}),
                              responses_id_secret=SECRET) as gw:  # fmt: skip
        gw.app.state.proxy.control.apply(key)
        served = (await mock_json(upstreams[0], "/mock/stats"))["requests_served"]
        for r in (await gw.client.post("/v1/responses", json=HELLO, headers=auth(secret)),
                  await gw.client.get(f"/v1/responses/{rid}", headers=auth(secret)),
                  await gw.client.delete(f"/v1/responses/{rid}", headers=auth(secret))):  # fmt: skip
            assert r.status_code == 503 and r.json()["error"]["code"] == "usage_unrecordable", r.text
        assert (await mock_json(upstreams[0], "/mock/stats"))["requests_served"] == served
        assert gw.events_of(key.team_id) == []  # refused calls take no room in the full spool


def scripted_provider(tail: list[tuple[str, dict[str, Any]]]) -> Any:
    """A provider whose stream is response.created, one delta, then `tail` (the mock never fails this way)."""

    async def create(request: Any) -> StreamingResponse:
        opening = {"id": "resp_scripted", "object": "response", "status": "in_progress", "output": [], "usage": None}
        events = [("response.created", {"response": opening}),
                  ("response.output_text.delta", {"item_id": "msg_1", "output_index": 0, "content_index": 0,
                                                  "delta": "partial answer"}), *tail]  # fmt: skip

        async def body() -> AsyncIterator[bytes]:
            for seq, (kind, payload) in enumerate(events):
                data = orjson.dumps({"type": kind, "sequence_number": seq, **payload})
                yield b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/responses", create, methods=["POST"])])


FAILED = {"id": "resp_scripted", "object": "response", "status": "failed", "output": [],
          "error": {"code": "server_error", "message": "model crashed"},
          "usage": {"input_tokens": 11, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0}}}  # fmt: skip


@pytest.mark.parametrize(
    ("tail", "usage", "source"),
    [
        ([("response.failed", {"response": FAILED})], (11, 3), "provider"),
        ([("error", {"code": "server_error", "message": "overloaded", "param": None})], None, "estimated"),
    ],
)
async def test_a_failed_response_or_an_error_event_is_an_error_billed_on_what_the_provider_said(
    bootstrap, tmp_path, tail, usage, source
):
    async with serving(scripted_provider(tail), "scripted-provider") as url:
        async with served_gateway(bootstrap, tmp_path, config({"a": f"{url}/v1"}), responses_id_secret=SECRET) as gw:
            secret, key = gw.key()
            async with gw.client.stream("POST", "/v1/responses", json={**HELLO, "stream": True},
                                        headers=auth(secret)) as r:  # fmt: skip
                events = await sse(r)
            assert [e["type"] for e in events] == ["response.created", "response.output_text.delta", tail[0][0]]
            assert events[0]["response"]["id"].startswith("resp_tw1.")
            if tail[0][0] == "response.failed":
                assert events[-1]["response"]["id"] == events[0]["response"]["id"]
            (e,) = await settled(gw, key.team_id, 1)
    assert e["status"] == "error" and e["error_code"] == "upstream_response_failed" and e["usage_source"] == source
    if usage is not None:
        assert (e["prompt_tokens"], e["completion_tokens"]) == usage
    else:  # estimated: the prompt from the request, the output from the deltas seen ("partial answer": 14 chars)
        assert e["prompt_tokens"] > 0 and e["completion_tokens"] == 4
