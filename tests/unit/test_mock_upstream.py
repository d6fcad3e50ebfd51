"""The mock upstream speaks OpenAI's wire format, counts tokens deterministically and injects faults on request."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.mock_upstream.app import create_app, embedding_vector
from services.mock_upstream.directives import DirectiveError, parse_directives
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import (
    VOCABULARY,
    completion_text,
    count_tokens,
    prompt_tokens_for_messages,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, world! How are you?", "name": "alice"},
]


def make_client(**settings: object) -> httpx.AsyncClient:
    app = create_app(MockSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as c:
        yield c


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


# --- tokens -----------------------------------------------------------------------------------------


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("it's 3.14") == 6  # it / ' / s / 3 / . / 14
    assert count_tokens("   ") == 0


def test_prompt_tokens_follow_the_recipe() -> None:
    # system: 3 + 4 ("You are terse .") ; user: 3 + 8 + name 1 ; priming 3
    assert prompt_tokens_for_messages(MESSAGES) == 3 + 4 + 3 + 8 + 1 + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "image_url"}]}]
    assert prompt_tokens_for_messages(parts) == 3 + 2 + 3
    assert prompt_tokens_for_messages([{"role": "assistant", "content": None}]) == 6


def test_completion_text_is_reproducible_and_depends_on_the_last_user_message() -> None:
    a = completion_text(MESSAGES, None)
    assert a == completion_text(MESSAGES, None)
    assert len(a) == 16
    other = [*MESSAGES[:-1], {"role": "user", "content": "Something else entirely"}]
    assert completion_text(other, None) != a
    assert completion_text(MESSAGES, 5) == a[:5]
    assert len(completion_text(MESSAGES, None, words=40)) == 40


@given(st.text(max_size=200), st.integers(min_value=0, max_value=300))
def test_completion_words_are_one_token_each(prompt: str, n: int) -> None:
    words = completion_text([{"role": "user", "content": prompt}], None, words=n)
    assert len(words) == n
    assert count_tokens(" ".join(words)) == n


def test_vocabulary_words_are_single_alphabetic_tokens() -> None:
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    assert all(w.isalpha() and w.islower() and count_tokens(w) == 1 for w in VOCABULARY)


def test_directives_body_overrides_headers_and_bad_values_raise() -> None:
    d = parse_directives({"x-mock-status": "500", "x-mock-latency-ms": "5"}, {"mock": {"status": 429}})
    assert (d.status, d.latency_ms) == (429, 5.0)
    assert parse_directives({}, {"mock": {"usage": False}}).usage is False
    with pytest.raises(DirectiveError):
        parse_directives({"x-mock-status": "abc"}, None)
    with pytest.raises(DirectiveError):
        parse_directives({}, {"mock": "nope"})


# --- chat completions -------------------------------------------------------------------------------


async def test_chat_completion_is_openai_shaped_with_exact_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content == " ".join(completion_text(MESSAGES, None))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens_for_messages(MESSAGES),
        "completion_tokens": count_tokens(content),
        "total_tokens": prompt_tokens_for_messages(MESSAGES) + count_tokens(content),
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_max_tokens_caps_the_answer_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, field: 3})
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        assert count_tokens(body["choices"][0]["message"]["content"]) == 3


async def test_usage_false_omits_usage_and_cached_tokens_are_reported(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "mock": {"usage": False}})
    assert r.status_code == 200 and "usage" not in r.json()
    r = await client.post(
        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "mock": {"cached_tokens": 7}}
    )
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 7}


async def test_stream_chunks_join_to_the_completion_and_end_with_usage_then_done(client: httpx.AsyncClient) -> None:
    payload = {
        "model": "m",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"stream_chunks": 5, "cached_tokens": 2},
    }
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = chunks[1:-2]
    assert len(content_chunks) == 5
    text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert text == " ".join(completion_text(MESSAGES, None, words=5))
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt_tokens_for_messages(MESSAGES),
        "completion_tokens": count_tokens(text),
        "total_tokens": prompt_tokens_for_messages(MESSAGES) + count_tokens(text),
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"stream_options": {"include_usage": False}},
        {"stream_options": {"include_usage": True}, "mock": {"usage": False}},
    ],
)
async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient, extra: dict) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True, **extra})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    assert not any(c.get("usage") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_disconnect_after_chunks_ends_the_stream_without_done(client: httpx.AsyncClient) -> None:
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "mock": {"disconnect_after_chunks": 3}}
    r = await client.post("/v1/chat/completions", json=payload)
    events = sse_events(r.text)
    assert "[DONE]" not in events
    chunks = [orjson.loads(e) for e in events]
    assert len(chunks) == 1 + 3
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


# --- fault and latency injection --------------------------------------------------------------------


async def test_fail_times_fails_the_first_attempts_then_succeeds_and_is_counted() -> None:
    app = create_app(MockSettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
        payload = {"model": "m", "messages": MESSAGES, "mock": {"fail_times": 2, "fail_key": "k1"}}
        statuses = [(await client.post("/v1/chat/completions", json=payload)).status_code for _ in range(4)]
        assert statuses == [503, 503, 200, 200]
        headers = {"X-Mock-Fail-Times": "1", "X-Mock-Fail-Key": "k2", "X-Mock-Status": "502"}
        statuses = [
            (
                await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=headers)
            ).status_code
            for _ in range(2)
        ]
        assert statuses == [502, 200]
        await client.get("/healthz")
        stats = (await client.get("/mock/stats")).json()
        assert stats == {"requests_served": 6, "fail_keys": {"k1": 4, "k2": 2}}
        assert app.state.requests_served == 6
        assert (await client.delete("/mock/stats")).json() == {"requests_served": 0, "fail_keys": {}}


@pytest.mark.parametrize("via", ["header", "body"])
async def test_status_injection_returns_openai_error_with_retry_after(client: httpx.AsyncClient, via: str) -> None:
    payload: dict = {"model": "m", "messages": MESSAGES}
    headers = {}
    if via == "header":
        headers = {"X-Mock-Status": "429"}
    else:
        payload["mock"] = {"status": 429}
    r = await client.post("/v1/chat/completions", json=payload, headers=headers)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == "rate_limit_exceeded"

    payload["mock"] = {"status": 429, "retry_after": 7}
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.headers["retry-after"] == "7"
    payload["mock"] = {"status": 500}
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "retry-after" not in r.headers


async def test_latency_injection_delays_the_response(client: httpx.AsyncClient) -> None:
    for kwargs in ({"headers": {"X-Mock-Latency-Ms": "50"}, "json": {"model": "m", "messages": MESSAGES}},
                   {"json": {"model": "m", "messages": MESSAGES, "mock": {"latency_ms": 50}}}):  # fmt: skip
        t0 = time.perf_counter()
        r = await client.post("/v1/chat/completions", **kwargs)
        assert r.status_code == 200
        assert time.perf_counter() - t0 >= 0.05


async def test_stream_chunk_delay_paces_the_words() -> None:
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "mock": {"stream_chunks": 5}}
    async with make_client(mock_stream_chunk_delay_ms=10) as client:
        t0 = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=payload)
        assert sse_events(r.text)[-1] == "[DONE]"
        assert time.perf_counter() - t0 >= 0.05


async def test_settings_latency_applies_to_every_response() -> None:
    async with make_client(mock_latency_ms=40) as client:
        t0 = time.perf_counter()
        r = await client.post("/v1/embeddings", json={"model": "e", "input": "x"})
        assert r.status_code == 200
        assert time.perf_counter() - t0 >= 0.04


async def test_error_rate_is_reproducible_for_a_seed() -> None:
    async def run(seed: int) -> list[int]:
        async with make_client(mock_error_rate=0.5, mock_seed=seed) as client:
            body = {"model": "m", "messages": MESSAGES}
            return [(await client.post("/v1/chat/completions", json=body)).status_code for _ in range(30)]

    first = await run(1)
    assert first == await run(1)
    assert set(first) == {200, 503}
    assert first != await run(2)


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/embeddings", b""),
        ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "mock": {"status": "x"}}'),
        ("/v1/embeddings", b'{"model": "e", "input": [1.5]}'),
    ],
)
async def test_bad_requests_get_a_400_in_openai_shape(client: httpx.AsyncClient, path: str, content: bytes) -> None:
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_unknown_route_is_an_openai_shaped_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


# --- embeddings, models, health ---------------------------------------------------------------------


async def test_embeddings_count_tokens_of_strings_and_token_arrays(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["Hello, world!", "a b"]})
    body = r.json()
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["data"][0]["embedding"] == embedding_vector("Hello, world!")
    assert body["usage"] == {"prompt_tokens": 4 + 2, "total_tokens": 6}

    r = await client.post("/v1/embeddings", json={"model": "e", "input": [[1, 2, 3], [4]]})
    assert r.json()["usage"]["prompt_tokens"] == 4
    r = await client.post("/v1/embeddings", json={"model": "e", "input": [5, 6, 7]})
    assert len(r.json()["data"]) == 1 and r.json()["usage"]["prompt_tokens"] == 3
    r = await client.post("/v1/embeddings", json={"model": "e", "input": "abc", "mock": {"usage": False}})
    assert "usage" not in r.json()


async def test_embeddings_base64_round_trips_and_dimensions_are_honoured(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/embeddings", json={"model": "e", "input": "abc", "encoding_format": "base64", "dimensions": 100}
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack("<100f", raw)) == embedding_vector("abc", 100)


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert {m["object"] for m in models["data"]} == {"model"}
    assert "gpt-4o-mini" in {m["id"] for m in models["data"]}
    assert (await client.get("/healthz")).json() == {"status": "ok"}


def test_settings_read_the_tollway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_MOCK_PORT", "9999")
    monkeypatch.setenv("TOLLWAY_MOCK_ERROR_RATE", "0.25")
    s = MockSettings()
    assert (s.mock_port, s.mock_error_rate, s.mock_host) == (9999, 0.25, "127.0.0.1")
