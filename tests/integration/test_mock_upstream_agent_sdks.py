"""The official openai (Responses) and anthropic (Messages) clients talk to the mock upstream over a real
socket, and every usage dimension they read back is the one the request asked for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from services.mock_upstream.app import create_app
from services.mock_upstream.messages_api import prompt_of
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import completion_text, count_tokens, prompt_tokens_for_messages, words_for
from tollway.servers import bound_port, make_server, start_server


@pytest.fixture(scope="module")
async def mock_url() -> AsyncIterator[str]:
    settings = MockSettings(mock_port=0)  # port 0: the OS picks a free one
    server = make_server(create_app(settings), settings.mock_host, settings.mock_port)
    task = await start_server(server, "mock upstream")
    try:
        yield f"http://127.0.0.1:{bound_port(server)}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task


@pytest.fixture
async def oai(mock_url: str) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def claude(mock_url: str) -> AsyncIterator[AsyncAnthropic]:
    client = AsyncAnthropic(base_url=mock_url, api_key="sk-ant-test", max_retries=0)
    yield client
    await client.close()


# --- OpenAI Responses ------------------------------------------------------------------------------


async def test_responses_create_reports_every_usage_dimension_it_was_asked_for(oai: AsyncOpenAI) -> None:
    prompt = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Name three birds."}]
    r = await oai.responses.create(
        model="gpt-5",
        instructions="Be brief.",
        input="Name three birds.",
        reasoning={"effort": "low"},
        service_tier="flex",
        extra_body={"mock": {"cached_tokens": 5, "cache_write_tokens": 3, "reasoning_tokens": 11}},
    )
    assert r.status == "completed" and r.service_tier == "flex"
    assert r.output_text == " ".join(completion_text(prompt, None))
    assert [o.type for o in r.output] == ["reasoning", "message"]
    u = r.usage
    assert u is not None
    prompt_tokens = prompt_tokens_for_messages(prompt)
    assert (u.input_tokens, u.input_tokens_details.cached_tokens) == (prompt_tokens, 5)
    # OpenAI's shape: the 3 written tokens are plain input, reported nowhere else
    assert u.input_tokens_details.model_dump(exclude_none=True) == {"cached_tokens": 5}
    assert (u.output_tokens, u.output_tokens_details.reasoning_tokens) == (16 + 11, 11)
    assert u.total_tokens == prompt_tokens + 27


async def test_responses_stream_sends_the_typed_events_in_order_and_completes_with_usage(oai: AsyncOpenAI) -> None:
    async with oai.responses.stream(
        model="gpt-5", input="Stream it.", extra_body={"mock": {"stream_chunks": 4, "cached_tokens": 2}}
    ) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected = " ".join(completion_text([{"role": "user", "content": "Stream it."}], None, words=4))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert final.output_text == expected
    assert final.usage is not None
    assert final.usage.input_tokens == prompt_tokens_for_messages([{"role": "user", "content": "Stream it."}])
    assert (final.usage.output_tokens, final.usage.input_tokens_details.cached_tokens) == (4, 2)


async def test_stored_response_follow_ups_and_previous_response_id(oai: AsyncOpenAI) -> None:
    first = await oai.responses.create(model="gpt-5", input=[{"role": "user", "content": "First turn."}])
    got = await oai.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage
    items = await oai.responses.input_items.list(first.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]

    second = await oai.responses.create(model="gpt-5", input="Second turn.", previous_response_id=first.id)
    chained = [
        {"role": "user", "content": "First turn."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Second turn."},
    ]
    assert second.previous_response_id == first.id
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens_for_messages(chained)

    await oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.create(model="gpt-5", input="x", previous_response_id=first.id)


async def test_background_response_can_be_cancelled_and_a_finished_one_cannot(oai: AsyncOpenAI) -> None:
    queued = await oai.responses.create(model="gpt-5", input="Slow job.", background=True)
    assert queued.status == "queued" and queued.usage is None
    cancelled = await oai.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.usage is None
    assert (await oai.responses.retrieve(queued.id)).status == "cancelled"

    done = await oai.responses.create(model="gpt-5", input="Slow job.", background=True)
    assert (await oai.responses.retrieve(done.id)).status == "completed"
    with pytest.raises(openai.BadRequestError):
        await oai.responses.cancel(done.id)


async def test_responses_stream_cut_ends_without_completed_and_is_stored_failed(oai: AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="gpt-5", input="Cut me.", stream=True, extra_body={"mock": {"disconnect_after_chunks": 2}}
    )
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds.count("response.output_text.delta") == 2
    assert "response.completed" not in kinds and "response.output_text.done" not in kinds
    created = events[0]
    assert created.type == "response.created"
    stored = await oai.responses.retrieve(created.response.id)
    assert stored.status == "failed" and stored.usage is None


async def test_responses_errors_are_openai_shaped_with_retry_after(oai: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.responses.create(model="gpt-5", input="x", extra_body={"mock": {"status": 429, "retry_after": 3}})
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "rate_limit_exceeded"


# --- Anthropic Messages -----------------------------------------------------------------------------

SYSTEM = [{"type": "text", "text": "You are a meticulous assistant. " * 20, "cache_control": {"type": "ephemeral"}}]


async def test_messages_create_usage_splits_count_tokens_exactly(claude: AsyncAnthropic) -> None:
    messages = [{"role": "user", "content": "How many legs has a spider?"}]
    counted = await claude.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
    m = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=messages,
        extra_body={"mock": {"cached_tokens": 4, "cache_write_tokens": 2, "cache_write_1h_tokens": 1}},
    )
    u = m.usage
    assert counted.input_tokens == 3 + 3 + count_tokens("How many legs has a spider?")
    assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == counted.input_tokens
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (4, 3)
    assert u.cache_creation is not None
    assert (u.cache_creation.ephemeral_5m_input_tokens, u.cache_creation.ephemeral_1h_input_tokens) == (2, 1)
    assert u.output_tokens == 16 and m.stop_reason == "end_turn" and u.service_tier == "standard"
    assert m.content[0].type == "text"
    assert m.content[0].text == " ".join(words_for("How many legs has a spider?", 16))


async def test_prompt_cached_call_writes_then_reads_the_prefix(claude: AsyncAnthropic) -> None:
    body = {"model": "claude-sonnet-4-5", "system": SYSTEM, "messages": [{"role": "user", "content": "Cache test."}]}
    prefix = 3 + 3 + count_tokens(SYSTEM[0]["text"])
    assert prompt_of(body).breakpoints[0][0] == prefix
    first = await claude.messages.create(max_tokens=50, **body)
    second = await claude.messages.create(max_tokens=50, **body)
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (prefix, 0)
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (0, prefix)
    total = (await claude.messages.count_tokens(**body)).input_tokens
    assert second.usage.input_tokens == total - prefix == first.usage.input_tokens


async def test_messages_stream_with_thinking_reports_cumulative_output(claude: AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "Think first."}],
        extra_body={"mock": {"reasoning_tokens": 5, "stream_chunks": 7}},
    ) as stream:
        kinds = [e.type async for e in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == " ".join(words_for("thinking\x00Think first.", 5))
    assert final.content[1].text == " ".join(words_for("Think first.", 7))
    assert final.usage.output_tokens == 5 + 7
    assert final.usage.input_tokens == 3 + 3 + count_tokens("Think first.")


async def test_messages_raw_stream_event_sequence_and_stream_cut(claude: AsyncAnthropic) -> None:
    messages = [{"role": "user", "content": "Raw."}]
    stream = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=50,
        messages=messages,
        stream=True,
        extra_body={"mock": {"stream_chunks": 3}},
    )
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the ping after message_start is read and dropped by the SDK
    assert events[0].message.usage.output_tokens == 1  # as Anthropic sends it: not the answer's count
    assert events[-2].usage.output_tokens == 3 and events[-2].delta.stop_reason == "end_turn"

    cut = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=50,
        messages=messages,
        stream=True,
        extra_body={"mock": {"disconnect_after_chunks": 1}},
    )
    kinds = [e.type async for e in cut]
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]


async def test_messages_errors_are_anthropic_shaped(claude: AsyncAnthropic, mock_url: str) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}], extra_body={"mock": {"status": 429}}
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": caught.value.body["error"]["message"]},
    }
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(model="c", max_tokens=5, messages=[])
    async with httpx.AsyncClient(base_url=mock_url) as raw:
        no_version = await raw.post("/v1/messages", headers={"x-api-key": "k"}, json={})
        assert no_version.status_code == 400 and no_version.json()["error"]["type"] == "invalid_request_error"
        no_key = await raw.post("/v1/messages", headers={"anthropic-version": "2023-06-01"}, json={})
        assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"


async def test_bearer_auth_and_forwarded_headers_are_seen(mock_url: str) -> None:
    client = AsyncAnthropic(base_url=mock_url, auth_token="oauth-token", max_retries=0)
    try:
        await client.messages.create(
            model="c",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31", "anthropic-version": "2023-06-01"},
        )
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=mock_url) as raw:
        seen = (await raw.get("/mock/last-request")).json()
    assert seen["auth"] == "bearer" and seen["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert seen["anthropic-version"] == "2023-06-01" and "oauth-token" not in str(seen)
