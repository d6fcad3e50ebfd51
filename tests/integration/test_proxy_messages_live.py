"""/v1/messages under a real uvicorn server with the official `anthropic` SDK: create, stream and count_tokens
as the SDK reads them, a client leaving mid-stream (billed once, upstream stopped), and a provider's own
`error` event mid-stream."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from schemas.config import Limits
from tests.integration.test_proxy_live import mock_json, served_gateway
from tests.integration.test_proxy_messages import dims, expected, messages_config
from tests.support.stack import mock_upstream
from tests.support.waiting import eventually
from tollway.servers import serving

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
async def live(bootstrap, tmp_path):
    async with mock_upstream() as up:
        async with served_gateway(bootstrap, tmp_path, messages_config(up)) as gw:
            gw.upstream = up  # type: ignore[attr-defined]
            yield gw


def sdk(gw: Any, secret: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(gw.client.base_url), api_key=secret, max_retries=0)


async def events_of(gw: Any, team: str, n: int) -> list[dict[str, Any]]:
    return await eventually(lambda: asyncio.sleep(0, gw.events_of(team)), lambda ev: len(ev) >= n)


async def test_the_anthropic_sdk_creates_streams_and_counts_through_the_proxy_exactly(live):
    secret, key = live.key()
    client = sdk(live, secret)
    mock = {"input_tokens": 60, "cached_tokens": 20, "cache_write_tokens": 6, "cache_write_1h_tokens": 4,
            "web_search_requests": 1}  # fmt: skip
    made = await client.messages.create(model="claude-alias", max_tokens=64, messages=MESSAGES,
                                        extra_body={"mock": mock})  # fmt: skip
    assert made.content[0].type == "text" and made.usage.cache_read_input_tokens == 20
    assert made._request_id and made._request_id.startswith("req_")  # the SDK reads the request-id header
    async with client.messages.stream(model="claude", max_tokens=64, messages=MESSAGES,
                                      extra_body={"mock": mock}) as stream:  # fmt: skip
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == len(text.split())
    counted = await client.messages.count_tokens(model="claude", messages=MESSAGES)
    assert counted.input_tokens > 0
    # the beta client, as Claude Code uses it: /v1/messages?beta=true with anthropic-beta
    beta = await client.beta.messages.create(model="claude", max_tokens=64, messages=MESSAGES,
                                             betas=["interleaved-thinking-2025-05-14"])  # fmt: skip
    assert (await mock_json(live.upstream, "/mock/last-request"))["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    beta_count = await client.beta.messages.count_tokens(model="claude", messages=MESSAGES)
    assert beta_count.input_tokens == counted.input_tokens and beta.usage.output_tokens > 0
    e_made, e_stream, e_count, e_beta, _ = await events_of(live, key.team_id, 5)
    assert dims(e_beta) == expected(beta.usage.model_dump())
    assert dims(e_made) == expected(made.usage.model_dump())
    assert dims(e_stream) == expected(final.usage.model_dump()) and e_stream["stream"] is True
    assert e_count["endpoint"] == "messages.count_tokens" and e_count["prompt_tokens"] == 0


async def test_a_client_leaving_mid_stream_stops_the_upstream_and_is_billed_once(live):
    secret, key = live.key()
    client = sdk(live, secret)
    async with client.messages.stream(model="claude", max_tokens=1000, messages=MESSAGES,
                                      extra_body={"mock": {"stream_chunks": 200, "chunk_delay_ms": 20}}) as stream:  # fmt: skip
        got = 0
        async for event in stream:
            if event.type == "content_block_delta":
                got += 1
            if got == 5:
                break  # leaving the block closes the connection mid-stream
        start_input = stream.current_message_snapshot.usage.input_tokens
    (e,) = await events_of(live, key.team_id, 1)
    assert e["client_disconnected"] is True and e["status"] == "ok" and e["stream"] is True
    assert e["prompt_tokens"] == start_input  # message_start's count: the provider's own
    assert e["usage_source"] == "estimated" and 5 <= e["completion_tokens"] < 100
    sent = (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"]
    await asyncio.sleep(0.3)  # 15 more chunk intervals: an upstream still being read would keep sending
    assert (await mock_json(live.upstream, "/mock/streams"))["chunks_sent"] <= sent + 1
    assert len(live.events_of(key.team_id)) == 1


async def test_the_sdk_sees_errors_as_its_own_types(live):
    secret, _ = live.key(limits=Limits(rpm=1))
    client = sdk(live, secret)
    stream = await client.messages.create(model="claude", max_tokens=64, messages=MESSAGES, stream=True,
                                          extra_body={"mock": {"disconnect_after_chunks": 2}})  # fmt: skip
    with pytest.raises(anthropic.APIStatusError, match="ended the stream early"):
        async for _ in stream:
            pass
    with pytest.raises(anthropic.RateLimitError) as err:
        await client.messages.create(model="claude", max_tokens=64, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert int(err.value.response.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(live, "tw-not-a-key").messages.create(model="claude", max_tokens=8, messages=MESSAGES)
    other, _ = live.key()
    with pytest.raises(anthropic.NotFoundError):
        await sdk(live, other).messages.count_tokens(model="gpt", messages=MESSAGES)
    with pytest.raises(anthropic.BadRequestError):
        await sdk(live, other).messages.create(model="claude", max_tokens=5000, messages=MESSAGES)


# ---- a provider's own error event mid-stream ----


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


async def overloaded_mid_stream(request: Request) -> StreamingResponse:
    """A provider that starts a message, sends one word, then reports overload in the stream (as Anthropic
    does when it is overloaded after the answer began)."""

    async def events():
        usage = {"input_tokens": 21, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 1}
        yield _sse("message_start", {"message": {"id": "msg_x", "type": "message", "role": "assistant", "content": [],
                                                 "model": "claude-upstream", "stop_reason": None,
                                                 "stop_sequence": None, "usage": usage}})  # fmt: skip
        yield _sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield _sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hello"}})
        yield _sse("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})

    return StreamingResponse(events(), media_type="text/event-stream")


async def test_a_providers_error_event_mid_stream_is_relayed_and_billed_with_what_it_reported(bootstrap, tmp_path):
    provider = Starlette(routes=[Route("/v1/messages", overloaded_mid_stream, methods=["POST"])])
    async with serving(provider, "overloaded-provider") as url:
        async with served_gateway(bootstrap, tmp_path, messages_config(url + "/v1")) as gw:
            secret, key = gw.key()
            stream = await sdk(gw, secret).messages.create(model="claude", max_tokens=64, messages=MESSAGES,
                                                           stream=True)  # fmt: skip
            seen = []
            with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
                async for event in stream:
                    seen.append(event.type)
            assert seen == ["message_start", "content_block_start", "content_block_delta"]
            (e,) = await events_of(gw, key.team_id, 1)
            assert e["status"] == "error" and e["error_code"] == "upstream_stream_error"
            assert e["prompt_tokens"] == 21 and e["completion_tokens"] >= 1 and e["usage_source"] == "estimated"


async def test_a_streamed_call_is_recorded_before_the_client_holds_its_last_event(live):
    """A process killed just after the client has the whole answer must still bill it: the event is written
    before message_stop goes out (tests/e2e/test_pipeline_kill9.py lost such calls)."""
    secret, key = live.key()
    recorded_at_stop = None
    async with live.client.stream("POST", "/v1/messages", json={"model": "claude", "max_tokens": 64, "stream": True,
                                  "messages": MESSAGES}, headers={"x-api-key": secret}) as r:  # fmt: skip
        async for line in r.aiter_lines():
            if '"type":"message_stop"' in line:
                recorded_at_stop = len(live.events_of(key.team_id))  # no await: what was there on arrival
    assert recorded_at_stop == 1


async def test_both_sdks_list_and_retrieve_models_in_their_own_shape(live):
    secret, _ = live.key()
    client = sdk(live, secret)
    # Anthropic's shape: only the models /v1/messages serves ("gpt" is chat-only), paged by name
    page = await client.models.list()
    assert [m.id for m in page.data] == ["claude"] and page.data[0].type == "model" and not page.has_more
    assert (await client.models.retrieve("claude")).id == "claude"
    assert (await client.models.retrieve("claude-alias")).id == "claude-alias"  # an alias, named as asked
    with pytest.raises(anthropic.NotFoundError) as gone:
        await client.models.retrieve("gpt")
    assert gone.value.body["error"]["type"] == "not_found_error"
    h = {"x-api-key": secret, "anthropic-version": "2023-06-01"}
    first = (await live.client.get("/v1/models", params={"limit": 1, "before_id": "gpt"}, headers=h)).json()
    assert (first["first_id"], first["last_id"], first["has_more"]) == ("claude", "claude", False)
    assert (await live.client.get("/v1/models", params={"after_id": "claude"}, headers=h)).json()["data"] == []
    bad = await live.client.get("/v1/models", params={"limit": 0}, headers=h)
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    # OpenAI's shape for the openai SDK: every model the key may call
    oai = openai.AsyncOpenAI(base_url=f"{str(live.client.base_url).rstrip('/')}/v1", api_key=secret, max_retries=0)
    assert sorted([m.id async for m in oai.models.list()]) == ["claude", "gpt"]
    assert (await oai.models.retrieve("gpt")).owned_by == "tollway"
    with pytest.raises(openai.NotFoundError) as nope:
        await oai.models.retrieve("no-such-model")
    assert nope.value.body["code"] == "model_not_found"  # the openai SDK hands over the `error` object
    unauth = await live.client.get("/v1/models/claude", headers={"anthropic-version": "2023-06-01"})
    assert unauth.status_code == 401 and unauth.json()["error"]["type"] == "authentication_error"
