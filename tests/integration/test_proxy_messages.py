"""Anthropic's Messages API through the gateway, against the real mock upstream: every usage dimension in the
event (recomputed from what the client saw), streams relayed unchanged, count_tokens seen but not billed,
headers passed on (never the caller's key), errors in Anthropic's shape, limits, quota and the cache."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import httpx
import orjson
import pytest

from schemas.config import GatewayConfig, Limits, parse_config
from tests.integration.test_proxy_gateway import Gateway, gateway
from tests.support.stack import mock_upstream

PROVIDER_KEY = "provider-secret-key"
ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                         "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"}  # fmt: skip


def messages_config(*upstreams: str, **extra: Any) -> GatewayConfig:
    providers = {f"anth{i}": {"base_url": u, "api": "anthropic", "timeout_s": 5, "headers": {"x-api-key": PROVIDER_KEY}}
                 for i, u in enumerate(upstreams)}  # fmt: skip
    providers["oai"] = {"base_url": upstreams[0], "timeout_s": 5}
    return parse_config({
        "providers": providers,
        "models": {
            "claude": {"aliases": ["claude-alias"], "max_output_tokens": 4096,
                       "routes": [{"provider": p, "model": "claude-upstream", "priority": i}
                                  for i, p in enumerate(n for n in providers if n != "oai")],
                       "prices": [{"input": "3", "output": "15", "cached_input": "0.3"}]},
            "gpt": {"routes": [{"provider": "oai"}], "prices": [{"input": "1", "output": "2"}]},
        },
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05, **extra.pop("retry", {})},
        **extra,
    })  # fmt: skip


def body(text: str = "Hello there, how are you?", **extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}


async def post(gw: Gateway, secret: str, payload: dict[str, Any], path: str = "/v1/messages",
               **headers: str) -> httpx.Response:  # fmt: skip
    h = {"x-api-key": secret, "anthropic-version": "2023-06-01", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return await gw.client.post(path, json=payload, headers=h)


def expected(usage: dict[str, Any]) -> dict[str, Any]:
    """The event's dimensions, recomputed from Anthropic's usage as the client saw it."""
    split = usage.get("cache_creation") or {}
    w1h = split.get("ephemeral_1h_input_tokens", 0)
    w5m = split.get("ephemeral_5m_input_tokens", usage.get("cache_creation_input_tokens", 0))
    return {
        "prompt_tokens": usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        + usage.get("cache_creation_input_tokens", 0),
        "completion_tokens": usage["output_tokens"],
        "cached_tokens": usage.get("cache_read_input_tokens", 0),
        "cache_write_tokens": w5m,
        "cache_write_1h_tokens": w1h,
        "web_search_requests": (usage.get("server_tool_use") or {}).get("web_search_requests", 0),
        "service_tier": usage.get("service_tier", ""),
    }  # fmt: skip


def dims(event: dict[str, Any]) -> dict[str, Any]:
    return {k: event[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                                  "cache_write_1h_tokens", "web_search_requests", "service_tier")}  # fmt: skip


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        out.append((name, orjson.loads(data)))
    return out


def stream_usage(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What a client reads: message_start's usage, overwritten field by field by message_delta's."""
    usage: dict[str, Any] = {}
    for name, data in events:
        if name == "message_start":
            usage.update(data["message"]["usage"])
        elif name == "message_delta":
            usage.update({k: v for k, v in data["usage"].items() if v is not None})
    return usage


@pytest.fixture
async def upstream():
    async with mock_upstream() as url:
        yield url


@pytest.fixture
async def gw(bootstrap, tmp_path, upstream):
    async with gateway(bootstrap, tmp_path, messages_config(upstream)) as g:
        g.upstream = upstream  # type: ignore[attr-defined]
        yield g


async def mock_get(url: str, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(url.removesuffix("/v1") + path)).json()


# ---- plain calls: every dimension ----


async def test_a_plain_message_is_billed_once_in_every_dimension(gw):
    secret, key = gw.key()
    mock = {"input_tokens": 100, "cached_tokens": 7, "cache_write_tokens": 5, "cache_write_1h_tokens": 3, "web_search_requests": 2,
            "service_tier": "priority"}  # fmt: skip
    r = await post(gw, secret, body(mock={**mock, "reasoning_tokens": 5}, metadata={"user_id": "end-user-7"}),
                   x_tollway_tags="project=apollo")  # fmt: skip
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["content"][0]["type"] == "thinking" and usage["output_tokens_details"]["thinking_tokens"] == 5
    assert usage["cache_read_input_tokens"] == 7 and usage["cache_creation"]["ephemeral_1h_input_tokens"] == 3
    (e,) = gw.events_of(key.team_id)
    assert dims(e) == expected(usage)
    assert e["prompt_tokens"] == 100 == usage["input_tokens"] + 7 + 5 + 3 and e["web_search_requests"] == 2
    assert e["endpoint"] == "messages" and e["status"] == "ok" and e["usage_source"] == "provider"
    assert e["served_model"] == "claude" and e["provider"] == "anth0" and e["stream"] is False
    assert e["reasoning_tokens"] == 5 and e["completion_tokens"] == usage["output_tokens"] > 5  # thinking inside
    assert e["end_user"] == "end-user-7" and e["metadata"]["project"] == "apollo"  # attributed as chat is


async def test_prompt_caching_writes_then_reads_with_the_five_minute_and_one_hour_split(gw):
    secret, key = gw.key()
    tag = uuid.uuid4().hex
    system = [{"type": "text", "text": f"You are a careful assistant {tag}. " * 20, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": "Answer briefly. " * 30, "cache_control": {"type": "ephemeral"}}]  # fmt: skip
    first = (await post(gw, secret, body("What is 2+2?", system=system))).json()["usage"]
    second = (await post(gw, secret, body("What is 2+2?", system=system))).json()["usage"]
    assert first["cache_read_input_tokens"] == 0 and first["cache_creation"]["ephemeral_1h_input_tokens"] > 0
    assert first["cache_creation"]["ephemeral_5m_input_tokens"] > 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    e1, e2 = gw.events_of(key.team_id)
    assert dims(e1) == expected(first) and dims(e2) == expected(second)
    assert e1["prompt_tokens"] == e2["prompt_tokens"]  # the same prompt, written once, then read
    assert e2["cached_tokens"] == e1["cache_write_tokens"] + e1["cache_write_1h_tokens"]


async def test_an_explicit_zero_stays_zero_and_a_missing_usage_is_estimated_and_marked(gw):
    secret, key = gw.key()
    zero = await post(gw, secret, body(mock={"input_tokens": 0, "stream_chunks": 0, "cached_tokens": 0}))
    assert zero.status_code == 200 and zero.json()["usage"]["output_tokens"] == 0
    none = await post(gw, secret, body("A question with some words in it", mock={"usage": False}))
    assert none.status_code == 200 and "usage" not in none.json()
    e_zero, e_none = gw.events_of(key.team_id)
    assert (e_zero["prompt_tokens"], e_zero["completion_tokens"], e_zero["usage_source"]) == (0, 0, "provider")
    assert e_none["usage_source"] == "estimated" and e_none["prompt_tokens"] > 0 and e_none["completion_tokens"] > 0


async def test_the_system_prompt_and_tools_count_in_the_estimate(gw):
    secret, key = gw.key()
    tools = [{"name": "lookup", "description": "x" * 4000, "input_schema": {"type": "object"}}]
    await post(gw, secret, body("hi", mock={"usage": False}))
    await post(gw, secret, body("hi", system="s" * 4000, tools=tools, mock={"usage": False}))
    small, big = gw.events_of(key.team_id)
    assert big["prompt_tokens"] - small["prompt_tokens"] >= 8000 // 4


# ---- streams ----


async def test_a_stream_is_relayed_unchanged_and_billed_from_message_start_and_message_delta(gw):
    secret, key = gw.key()
    payload = body(
        stream=True, mock={"input_tokens": 50, "cached_tokens": 4, "cache_write_1h_tokens": 2, "web_search_requests": 1}
    )
    direct_headers = {"x-api-key": PROVIDER_KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient() as c:  # the same stream straight from the mock, to compare the relay with
        direct = await c.post(gw.upstream + "/messages", json={**payload, "model": "claude-upstream"},
                              headers=direct_headers)  # fmt: skip
    r = await post(gw, secret, payload)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    names = [n for n, _ in events]
    assert names == [n for n, _ in sse(direct.text)]  # the same typed events, in the same order
    assert names[0] == "message_start" and names[-1] == "message_stop" and "content_block_delta" in names
    assert all(data["type"] == name for name, data in events)
    usage = stream_usage(events)
    assert events[0][1]["message"]["usage"]["output_tokens"] == 1  # a placeholder: not added to the total
    (e,) = gw.events_of(key.team_id)
    assert dims(e) == expected(usage) and e["stream"] is True and e["usage_source"] == "provider"
    assert e["completion_tokens"] == usage["output_tokens"] and e["ttft_ms"] is not None and e["status"] == "ok"


async def test_a_stream_cut_upstream_is_an_error_billed_with_the_usage_seen_so_far(gw):
    secret, key = gw.key()
    r = await post(gw, secret, body(stream=True, mock={"stream_chunks": 40, "disconnect_after_chunks": 5}))
    events = sse(r.text)
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] in ANTHROPIC_ERROR_TYPES
    assert "message_stop" not in [n for n, _ in events]
    start_usage = events[0][1]["message"]["usage"]
    (e,) = gw.events_of(key.team_id)
    assert e["status"] == "error" and e["error_code"] == "upstream_stream_broken"
    assert e["prompt_tokens"] == start_usage["input_tokens"]  # message_start's count, from the provider
    assert 5 <= e["completion_tokens"] < 40 and e["usage_source"] == "estimated"  # the output relayed, estimated


async def test_a_stream_with_no_usage_at_all_is_estimated(gw):
    secret, key = gw.key()
    r = await post(gw, secret, body(stream=True, mock={"usage": False, "stream_chunks": 12}))
    assert sse(r.text)[-1][0] == "message_stop"
    (e,) = gw.events_of(key.team_id)
    assert e["usage_source"] == "estimated" and e["status"] == "ok" and e["prompt_tokens"] > 0
    assert e["completion_tokens"] >= 12


# ---- count_tokens ----


async def test_count_tokens_passes_the_providers_count_and_is_seen_but_not_billed(gw):
    secret, key = gw.key(limits=Limits(tokens_per_month=1))
    payload = {"model": "claude", "system": "Be brief.", "messages": [{"role": "user", "content": "Count me"}]}
    r = await post(gw, secret, payload, "/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    async with httpx.AsyncClient() as c:
        direct = await c.post(gw.upstream + "/messages/count_tokens", json={**payload, "model": "claude-upstream"},
                              headers={"x-api-key": PROVIDER_KEY, "anthropic-version": "2023-06-01"})  # fmt: skip
    assert r.json() == direct.json() and r.json()["input_tokens"] > 0
    (e,) = gw.events_of(key.team_id)
    assert e["endpoint"] == "messages.count_tokens" and e["status"] == "ok" and e["served_model"] == "claude"
    assert (e["prompt_tokens"], e["completion_tokens"]) == (0, 0)
    assert not gw.app.state.proxy.quota.reservations  # nothing was reserved for it
    # and the 1-token monthly quota still admits it after the gate has local usage to count
    await post(gw, secret, body())
    again = await post(gw, secret, payload, "/v1/messages/count_tokens")
    assert again.status_code == 200


async def test_count_tokens_is_rate_limited_by_rpm(gw):
    secret, _ = gw.key(limits=Limits(rpm=2))
    payload = {"model": "claude", "messages": [{"role": "user", "content": "Count me"}]}
    codes = [(await post(gw, secret, payload, "/v1/messages/count_tokens")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


# ---- keys and headers ----


async def test_keys_as_x_api_key_or_bearer_or_both_and_never_forwarded(gw):
    secret, key = gw.key()
    h = {"anthropic-version": "2023-06-01"}
    for auth in ({"x-api-key": secret}, {"authorization": f"Bearer {secret}"},
                 {"authorization": f"Bearer {secret}", "x-api-key": secret},
                 {"authorization": "Bearer some-oauth-token", "x-api-key": secret}):  # fmt: skip
        r = await gw.client.post("/v1/messages", json=body(), headers={**h, **auth})
        assert r.status_code == 200, (auth.keys(), r.text)
        seen = await mock_get(gw.upstream, "/mock/last-request")
        assert seen["api_key_sha256"] == hashlib.sha256(PROVIDER_KEY.encode()).hexdigest()  # the gateway's key
    assert len(gw.events_of(key.team_id)) == 4


async def test_the_callers_anthropic_version_and_beta_are_passed_on(gw):
    secret, _ = gw.key()
    beta = "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"
    await post(gw, secret, body(), anthropic_version="2023-01-01", anthropic_beta=beta)
    seen = await mock_get(gw.upstream, "/mock/last-request")
    assert seen["anthropic-version"] == "2023-01-01" and seen["anthropic-beta"] == beta
    await post(gw, secret, body(stream=True), anthropic_beta="one-beta")
    seen = await mock_get(gw.upstream, "/mock/last-request")
    assert seen["anthropic-beta"] == "one-beta" and seen["anthropic-version"] == "2023-06-01"
    r = await gw.client.post("/v1/messages", json=body(), headers={"x-api-key": secret})  # no version: the default
    assert r.status_code == 200
    assert (await mock_get(gw.upstream, "/mock/last-request"))["anthropic-version"] == "2023-06-01"


async def test_the_beta_flag_of_the_query_string_is_passed_on_and_nothing_else(gw):
    # Claude Code (the TypeScript SDK) and older Python SDKs call POST /v1/messages?beta=true for beta features
    secret, key = gw.key()
    for path, payload in (("/v1/messages", body()), ("/v1/messages", body(stream=True)),
                          ("/v1/messages/count_tokens", {k: v for k, v in body().items() if k != "max_tokens"})):  # fmt: skip
        r = await post(gw, secret, payload, f"{path}?beta=true")
        assert r.status_code == 200, r.text
        seen = await mock_get(gw.upstream, "/mock/last-request")
        assert seen["path"].endswith(path.removeprefix("/v1")) and seen["query"] == "beta=true", seen
    for query in ("", "?beta=false", "?other=1&x=y"):
        assert (await post(gw, secret, body(), f"/v1/messages{query}")).status_code == 200
        assert (await mock_get(gw.upstream, "/mock/last-request"))["query"] == ""
    assert (await post(gw, secret, body(), "/v1/messages?x=1&beta=true")).status_code == 200
    assert (await mock_get(gw.upstream, "/mock/last-request"))["query"] == "beta=true"
    assert len(gw.events_of(key.team_id)) == 7


# ---- errors in Anthropic's shape ----


def anthropic_error(r: httpx.Response, status: int, kind: str, request_id: bool = True) -> str:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == kind and data["error"]["message"], data
    assert not request_id or r.headers["x-request-id"]
    return data["error"]["message"]


async def test_errors_are_in_anthropics_shape_with_the_same_statuses(gw):
    secret, key = gw.key()
    anthropic_error(await post(gw, "tw-wrong", body()), 401, "authentication_error")
    anthropic_error(await gw.client.post("/v1/messages", json=body()), 401, "authentication_error")
    for bad in ({**body(), "max_tokens": None}, {k: v for k, v in body().items() if k != "max_tokens"},
                body(max_tokens=0), body(max_tokens=True), body(max_tokens=5000), {**body(), "messages": []},
                {**body(), "messages": [{"content": "no role"}]}, body(stream="yes"),
                {**body(), "messages": [{"role": "user"}]}):  # fmt: skip
        anthropic_error(await post(gw, secret, bad), 400, "invalid_request_error")
    r = await gw.client.post("/v1/messages", content=b"{not json", headers={"x-api-key": secret})
    anthropic_error(r, 400, "invalid_request_error")
    msg = anthropic_error(await post(gw, secret, body(model="gpt")), 404, "not_found_error")
    assert "messages" in msg  # names the endpoint the model is not served on
    anthropic_error(await post(gw, secret, body(model="nope")), 404, "not_found_error")
    anthropic_error(await post(gw, secret, body(mock={"status": 400})), 400, "invalid_request_error")
    big = body("x" * (70 * 1024))
    anthropic_error(await post(gw, secret, big), 413, "request_too_large")
    # no such route or method: answered before any handler (no call, no request id), still in Anthropic's shape
    r = await gw.client.get("/v1/messages", headers={"x-api-key": secret})
    anthropic_error(r, 405, "invalid_request_error", request_id=False)
    anthropic_error(await post(gw, secret, body(), "/v1/messages/batches"), 404, "not_found_error", request_id=False)
    # the same failures on chat keep OpenAI's shape
    r = await gw.client.post("/v1/chat/completions", json={"model": "nope", "messages": []},
                             headers={"authorization": f"Bearer {secret}"})  # fmt: skip
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    assert all(e["status"] in ("error", "rejected") for e in gw.events_of(key.team_id))


async def test_rate_limit_and_quota_429s_are_rate_limit_errors_with_their_headers(gw):
    secret, _ = gw.key(limits=Limits(rpm=1))
    assert (await post(gw, secret, body())).status_code == 200
    r = await post(gw, secret, body())
    anthropic_error(r, 429, "rate_limit_error")
    assert int(r.headers["retry-after"]) >= 1 and "x-ratelimit-limit-requests" in r.headers
    secret, key = gw.key(limits=Limits(tokens_per_month=10))
    assert (await post(gw, secret, body())).status_code == 200
    r = await post(gw, secret, body())
    assert "quota" in anthropic_error(r, 429, "rate_limit_error")
    assert int(r.headers["retry-after"]) >= 1
    ok, rejected = gw.events_of(key.team_id)
    assert ok["status"] == "ok" and rejected["status"] == "rejected" and rejected["error_code"] == "insufficient_quota"
    stream = await post(gw, secret, body(stream=True))  # a stream is refused before it starts, the same way
    anthropic_error(stream, 429, "rate_limit_error")


async def test_upstream_overload_is_retried_then_falls_back(bootstrap, tmp_path):
    async with mock_upstream() as flaky, mock_upstream() as up:
        async with gateway(bootstrap, tmp_path, messages_config(flaky, up, retry={"retries_per_route": 1})) as g:
            secret, key = g.key()
            tag = uuid.uuid4().hex
            r = await post(g, secret, body(mock={"fail_times": 1, "fail_key": tag, "status": 529}))
            assert r.status_code == 200
            async with httpx.AsyncClient() as c:
                await c.put(flaky.removesuffix("/v1") + "/mock/fault", json={"status": 529})
            r = await post(g, secret, body(stream=True))
            assert r.status_code == 200 and sse(r.text)[-1][0] == "message_stop"
            e1, e2 = g.events_of(key.team_id)
            assert e1["attempts"] == 2 and e1["fallback_used"] is False
            assert e2["fallback_used"] is True and e2["provider"] == "anth1" and e2["status"] == "ok"
            async with httpx.AsyncClient() as c:
                await c.put(up.removesuffix("/v1") + "/mock/fault", json={"status": 529})
            r = await post(g, secret, body())
            anthropic_error(r, 503, "overloaded_error")


# ---- the response cache ----


async def test_temperature_zero_is_cached_and_a_hit_replays_as_a_stream(gw):
    secret, key = gw.key()
    q = body(f"Cache me {uuid.uuid4().hex}", temperature=0)
    first = await post(gw, secret, q)
    hit = await post(gw, secret, q)
    assert hit.headers["x-tollway-cache"] == "hit" and hit.json() == first.json()
    streamed = await post(gw, secret, {**q, "stream": True})
    events = sse(streamed.text)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == first.json()["content"][0]["text"]
    e_miss, e_hit, e_stream_hit = gw.events_of(key.team_id)
    assert e_hit["status"] == e_stream_hit["status"] == "cached" and e_hit["cache_hit"] is True
    assert dims(e_hit) | {"service_tier": ""} == dims(e_miss) | {"service_tier": ""}
    # a streamed answer is cached too, and replayed plain
    s = body(f"Stream then cache {uuid.uuid4().hex}", temperature=0, stream=True)
    streamed = sse((await post(gw, secret, s)).text)
    plain = await post(gw, secret, {**s, "stream": False})
    assert plain.headers["x-tollway-cache"] == "hit"
    assert plain.json()["content"][0]["text"] == "".join(
        d["delta"].get("text", "") for n, d in streamed if n == "content_block_delta"
    )
    assert plain.json()["usage"]["output_tokens"] == stream_usage(streamed)["output_tokens"]
