"""The mock's Responses and Messages APIs on the wire: event framing, every usage dimension, prompt caching,
stored-response bookkeeping, fault injection and 4xx answers in each API's own error shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mock_upstream import messages_api
from services.mock_upstream.app import create_app
from services.mock_upstream.directives import parse_directives
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import count_tokens, prompt_tokens_for_messages
from services.mock_upstream.usage import split_input

ANTHROPIC = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": "Hello, mock!"}]


def make_client(**settings: object) -> httpx.AsyncClient:
    app = create_app(MockSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as c:
        yield c


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs; every frame must carry both lines, and the name must match data.type."""
    out = []
    for frame in text.split("\n\n")[:-1]:
        event_line, data_line = frame.split("\n")
        name = event_line.removeprefix("event: ")
        data = orjson.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


async def message(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/messages", headers=ANTHROPIC, json={"model": "claude", "max_tokens": 100, **body})


# --- usage arithmetic -----------------------------------------------------------------------------------


@given(
    st.integers(0, 500),
    st.none() | st.integers(0, 600),
    st.none() | st.integers(0, 600),
    st.none() | st.integers(0, 600),
    st.none() | st.integers(0, 700),
)
def test_cache_directives_never_exceed_the_prompt(
    derived: int, cached: int | None, w5: int | None, w1h: int | None, total: int | None
) -> None:
    mock = {"cached_tokens": cached, "cache_write_tokens": w5, "cache_write_1h_tokens": w1h, "input_tokens": total}
    d = parse_directives({}, {"mock": mock})
    n, read, write5, write1h = split_input(derived, d, cache_read=9, cache_write_5m=9)
    assert n == (derived if total is None else total)
    assert min(read, write5, write1h) >= 0 and read + write5 + write1h <= n
    if cached is None and w5 is None and w1h is None:
        assert (read, write5) == (min(9, n), min(9, n - read))  # no cache directive: the caller's counts stand
    else:  # any cache directive, an explicit 0 included, replaces the caller's own bookkeeping (the 9s)
        assert (read, write5) == (min(cached or 0, n), min(w5 or 0, n - min(cached or 0, n)))


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
async def test_negative_directive_is_a_400_in_the_endpoint_shape(client: httpx.AsyncClient, path: str) -> None:
    r = await client.post(path, headers=ANTHROPIC, json={"model": "m", "input": "x", "mock": {"reasoning_tokens": -1}})
    assert r.status_code == 400
    body = r.json()
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error" and "reasoning_tokens" in body["error"]["message"]


async def test_chat_takes_the_input_and_reasoning_directives(client: httpx.AsyncClient) -> None:
    mock = {"input_tokens": 5000, "cached_tokens": 7000, "reasoning_tokens": 4, "stream_chunks": 3}
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "mock": mock})
    assert r.json()["usage"] == {
        "prompt_tokens": 5000,
        "completion_tokens": 3 + 4,
        "total_tokens": 5007,
        "prompt_tokens_details": {"cached_tokens": 5000},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }


# --- Responses ------------------------------------------------------------------------------------------


async def test_responses_stream_frames_reasoning_and_search_items_then_exact_usage(client: httpx.AsyncClient) -> None:
    mock = {"reasoning_tokens": 6, "web_search_requests": 2, "stream_chunks": 2, "cache_write_tokens": 1,
            "cache_write_1h_tokens": 2, "cached_tokens": 3}  # fmt: skip
    r = await client.post("/v1/responses", json={"model": "gpt-5", "input": "Hi", "stream": True, "mock": mock})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    added = [(d["output_index"], d["item"]["type"]) for n, d in events if n == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "web_search_call"), (2, "web_search_call"), (3, "message")]
    deltas = [d for n, d in events if n == "response.output_text.delta"]
    assert len(deltas) == 2 and all((d["output_index"], d["content_index"]) == (3, 0) for d in deltas)
    name, done = events[-1]
    assert name == "response.completed" and done["response"]["status"] == "completed"
    prompt = prompt_tokens_for_messages([{"role": "user", "content": "Hi"}])
    assert done["response"]["usage"] == {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 3},  # OpenAI's shape: the 3 written tokens are plain input
        "output_tokens": 2 + 6,
        "output_tokens_details": {"reasoning_tokens": 6},
        "total_tokens": prompt + 8,
    }
    assert events[0][1]["response"]["usage"] is None and events[0][1]["response"]["status"] == "in_progress"


async def test_max_output_tokens_makes_an_incomplete_response(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-5", "input": "Hi", "max_output_tokens": 10, "mock": {"reasoning_tokens": 4}}
    plain = (await client.post("/v1/responses", json=body)).json()
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "max_output_tokens"}
    assert plain["usage"]["output_tokens"] == 10 and plain["usage"]["output_tokens_details"]["reasoning_tokens"] == 4
    streamed = sse((await client.post("/v1/responses", json={**body, "stream": True})).text)
    assert streamed[-1][0] == "response.incomplete"


@pytest.mark.parametrize(
    ("asked", "directive", "served"),
    [(None, None, "default"), ("auto", None, "default"), ("flex", None, "flex"), ("priority", None, "priority"),
     ("fast", None, "priority"), ("priority", "default", "default")],
)  # fmt: skip
async def test_responses_service_tier_is_served_as_asked_unless_steered(
    client: httpx.AsyncClient, asked: str | None, directive: str | None, served: str
) -> None:
    body: dict[str, Any] = {"model": "gpt-5", "input": "x", "mock": {"service_tier": directive}}
    if asked is not None:
        body["service_tier"] = asked
    assert (await client.post("/v1/responses", json=body)).json()["service_tier"] == served


async def test_input_items_page_in_both_orders(client: httpx.AsyncClient) -> None:
    items = [{"type": "message", "role": "user", "content": f"turn {i}"} for i in range(5)]
    rid = (await client.post("/v1/responses", json={"model": "m", "input": items})).json()["id"]
    page = (await client.get(f"/v1/responses/{rid}/input_items", params={"limit": 2})).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["turn 4", "turn 3"] and page["has_more"] is True
    rest = (await client.get(f"/v1/responses/{rid}/input_items", params={"after": page["last_id"]})).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["turn 2", "turn 1", "turn 0"]
    assert rest["has_more"] is False and rest["first_id"] == rest["data"][0]["id"]
    asc = (await client.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"})).json()
    assert [i["content"][0]["text"] for i in asc["data"]] == [f"turn {i}" for i in range(5)]
    bad = await client.get(f"/v1/responses/{rid}/input_items", params={"limit": 0})
    assert bad.status_code == 400


async def test_store_false_is_not_retrievable_and_unknown_ids_are_404(client: httpx.AsyncClient) -> None:
    rid = (await client.post("/v1/responses", json={"model": "m", "input": "x", "store": False})).json()["id"]
    for r in (await client.get(f"/v1/responses/{rid}"), await client.delete("/v1/responses/resp_nope")):
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [{"input": "x"}, {"model": "m"}, {"model": "m", "input": 5}, {"model": "m", "input": [{"role": "robot"}]},
     {"model": "m", "input": "x", "service_tier": "gold"}, {"model": "m", "input": "x", "max_output_tokens": "9"},
     {"model": "m", "input": "x", "instructions": ["not", "a", "string"]}],
)  # fmt: skip
async def test_bad_responses_requests_get_a_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"]


async def test_outage_and_fail_times_reach_the_follow_ups_too(client: httpx.AsyncClient) -> None:
    rid = (await client.post("/v1/responses", json={"model": "m", "input": "x"})).json()["id"]
    await client.put("/mock/fault", json={"status": 503})
    assert (await client.get(f"/v1/responses/{rid}")).status_code == 503
    outage = await message(client, messages=USER)
    assert outage.status_code == 503 and outage.json()["type"] == "error"
    await client.delete("/mock/fault")
    headers = {"X-Mock-Fail-Times": "1", "X-Mock-Fail-Key": "follow", "X-Mock-Status": "502"}
    statuses = [(await client.get(f"/v1/responses/{rid}", headers=headers)).status_code for _ in range(2)]
    assert statuses == [502, 200]


async def test_latency_applies_to_both_apis(client: httpx.AsyncClient) -> None:
    for call in (
        client.post("/v1/responses", json={"model": "m", "input": "x", "mock": {"latency_ms": 50}}),
        message(client, messages=USER, mock={"latency_ms": 50}),
    ):
        t0 = time.perf_counter()
        assert (await call).status_code == 200
        assert time.perf_counter() - t0 >= 0.05


# --- Messages -------------------------------------------------------------------------------------------


def block(text: str, ttl: str | None = None) -> dict[str, Any]:
    cc: dict[str, Any] = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    return {"type": "text", "text": text, "cache_control": cc}


async def test_two_breakpoints_write_each_stretch_at_its_own_ttl_then_read_the_longest(
    client: httpx.AsyncClient,
) -> None:
    tools = [{"name": "lookup", "description": "Find a thing", "input_schema": {"type": "object"},
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]  # fmt: skip
    body = {"tools": tools, "system": [block("Long shared instructions here.")], "messages": USER}
    [(tools_upto, _, _), (system_upto, _, _)] = messages_api.prompt_of({"model": "claude", **body}).breakpoints
    first = (await message(client, **body)).json()["usage"]
    assert first["cache_creation"] == {"ephemeral_1h_input_tokens": tools_upto,
                                       "ephemeral_5m_input_tokens": system_upto - tools_upto}  # fmt: skip
    assert first["cache_creation_input_tokens"] == system_upto and first["cache_read_input_tokens"] == 0
    second = (await message(client, **body)).json()["usage"]
    assert (second["cache_read_input_tokens"], second["cache_creation_input_tokens"]) == (system_upto, 0)
    # a different model is a different cache
    other = (
        await client.post("/v1/messages", headers=ANTHROPIC, json={"model": "other", "max_tokens": 9, **body})
    ).json()
    assert other["usage"]["cache_read_input_tokens"] == 0


async def test_forgetting_the_prompt_cache_and_an_explicit_zero_both_force_a_miss(client: httpx.AsyncClient) -> None:
    body = {"system": [block("Shared by two tests.")], "messages": USER}
    await message(client, **body)
    assert (await message(client, **body)).json()["usage"]["cache_read_input_tokens"] > 0
    forced = (await message(client, **body, mock={"cached_tokens": 0})).json()["usage"]
    assert (forced["cache_read_input_tokens"], forced["cache_creation_input_tokens"]) == (0, 0)
    assert (await client.delete("/mock/prompt-cache")).json() == {"forgotten": 1}
    cold = (await message(client, **body)).json()["usage"]
    assert cold["cache_read_input_tokens"] == 0 and cold["cache_creation_input_tokens"] > 0


async def test_a_cached_prefix_expires_after_its_ttl(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"system": [block("Expiring prefix.")], "messages": USER}
    now = time.monotonic()
    monkeypatch.setattr(messages_api.time, "monotonic", lambda: now)
    assert (await message(client, **body)).json()["usage"]["cache_read_input_tokens"] == 0
    monkeypatch.setattr(messages_api.time, "monotonic", lambda: now + 299)
    assert (await message(client, **body)).json()["usage"]["cache_read_input_tokens"] > 0  # and refreshed
    monkeypatch.setattr(messages_api.time, "monotonic", lambda: now + 299 + 301)
    usage = (await message(client, **body)).json()["usage"]
    assert usage["cache_read_input_tokens"] == 0 and usage["cache_creation_input_tokens"] > 0


async def test_top_level_cache_control_caches_the_whole_prompt(client: httpx.AsyncClient) -> None:
    body = {"messages": USER, "cache_control": {"type": "ephemeral"}}
    total = (await client.post("/v1/messages/count_tokens", headers=ANTHROPIC, json={"model": "claude", **body})).json()
    assert total == {"input_tokens": 3 + 3 + count_tokens("Hello, mock!")}
    first = (await message(client, **body)).json()["usage"]
    assert (first["input_tokens"], first["cache_creation_input_tokens"]) == (0, total["input_tokens"])


async def test_messages_stream_usage_is_cumulative_and_usage_false_reports_none(client: httpx.AsyncClient) -> None:
    mock = {"stream_chunks": 3, "web_search_requests": 1, "service_tier": "priority", "reasoning_tokens": 2}
    events = sse((await message(client, messages=USER, stream=True, mock=mock)).text)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    deltas = [d["delta"]["type"] for n, d in events if n == "content_block_delta"]
    assert deltas == ["thinking_delta", "thinking_delta", "signature_delta", "text_delta", "text_delta", "text_delta"]
    start = events[0][1]["message"]["usage"]
    assert start["output_tokens"] == 1 and start["service_tier"] == "priority"
    final = events[-2][1]["usage"]
    assert final["output_tokens"] == 5 and final["output_tokens_details"] == {"thinking_tokens": 2}
    assert final["server_tool_use"] == {"web_search_requests": 1, "web_fetch_requests": 0}

    silent = sse((await message(client, messages=USER, stream=True, mock={"usage": False})).text)
    assert "usage" not in silent[0][1]["message"] and "usage" not in silent[-2][1]
    assert "usage" not in (await message(client, messages=USER, mock={"usage": False})).json()


async def test_stream_cut_counts_sent_chunks_across_apis(client: httpx.AsyncClient) -> None:
    await message(client, messages=USER, stream=True, mock={"disconnect_after_chunks": 2})
    await client.post("/v1/responses", json={"model": "m", "input": "x", "stream": True,
                                             "mock": {"disconnect_after_chunks": 3}})  # fmt: skip
    assert (await client.get("/mock/streams")).json() == {"chunks_sent": 5}


async def test_thinking_display_omitted_bills_the_tokens_without_the_text(client: httpx.AsyncClient) -> None:
    thinking = {"type": "enabled", "budget_tokens": 50, "display": "omitted"}
    m = (await message(client, messages=USER, thinking=thinking)).json()
    assert m["content"][0]["type"] == "thinking" and m["content"][0]["thinking"] == ""
    assert m["content"][0]["signature"] and m["usage"]["output_tokens"] == 16 + 8


@pytest.mark.parametrize(
    "body",
    [{"messages": USER}, {"model": "c", "messages": USER}, {"model": "c", "max_tokens": 9, "messages": []},
     {"model": "c", "max_tokens": 9, "messages": [{"role": "system", "content": "x"}]},
     {"model": "c", "max_tokens": 9, "messages": [{"role": "user", "content": 3}]},
     {"model": "c", "max_tokens": 9, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 9}},
     {"model": "c", "max_tokens": 9, "messages": USER, "service_tier": "priority"},
     {"model": "c", "max_tokens": 9, "messages": USER, "system": [block("x", ttl="2h")]}],
)  # fmt: skip
async def test_bad_messages_requests_get_an_anthropic_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.post("/v1/messages", headers=ANTHROPIC, json=body)
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


async def test_unparseable_body_and_injected_529_are_anthropic_shaped(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", headers={**ANTHROPIC, "content-type": "application/json"}, content=b"{no")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await message(client, messages=USER, mock={"status": 529})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    r = await client.post("/v1/messages/count_tokens", headers=ANTHROPIC, json={"model": "c", "messages": USER,
                                                                               "mock": {"input_tokens": 250_000}})  # fmt: skip
    assert r.json() == {"input_tokens": 250_000}
