"""The official openai client talks to the mock upstream over a real socket."""

from __future__ import annotations

import asyncio
import signal

import pytest
from openai import AsyncOpenAI, RateLimitError

from services.mock_upstream.app import create_app
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import completion_text, count_tokens, prompt_tokens_for_messages
from tollway.servers import QuietServer, bound_port, make_server

MESSAGES = [{"role": "user", "content": "Say something deterministic."}]


async def start(server: QuietServer) -> asyncio.Task[None]:
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                task.result()  # surfaces a bind failure instead of hanging
                pytest.fail("server exited before starting")
            await asyncio.sleep(0.01)
    return task


async def stop(server: QuietServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    async with asyncio.timeout(10):
        await task


async def test_openai_sdk_plain_streamed_and_embeddings_calls() -> None:
    settings = MockSettings(mock_port=0)  # port 0: the OS picks a free one, no race with other tests
    app = create_app(settings)
    server = make_server(app, settings.mock_host, settings.mock_port)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    task = await start(server)
    try:
        # the runtime owns signals: a running server must not have replaced its handlers
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{bound_port(server)}/v1", api_key="x", max_retries=0)
        prompt_tokens = prompt_tokens_for_messages(MESSAGES)
        expected = " ".join(completion_text(MESSAGES, None))

        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert plain.model == "gpt-4o-mini"
        assert plain.choices[0].message.content == expected
        assert plain.choices[0].finish_reason == "stop"
        assert plain.usage is not None
        assert plain.usage.prompt_tokens == prompt_tokens
        assert plain.usage.completion_tokens == count_tokens(expected)
        assert plain.usage.prompt_tokens_details.cached_tokens == 0

        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        pieces: list[str] = []
        finish_reasons: list[str] = []
        usage = None
        async for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                if choice.finish_reason:
                    finish_reasons.append(choice.finish_reason)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == expected
        assert finish_reasons == ["stop"]
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, count_tokens(expected))

        emb = await client.embeddings.create(model="text-embedding-3-small", input=["one two", "three"])
        assert [len(d.embedding) for d in emb.data] == [8, 8]
        assert emb.usage.prompt_tokens == 3

        with pytest.raises(RateLimitError) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_body={"mock": {"status": 429, "retry_after": 2}}
            )
        assert caught.value.response.headers["retry-after"] == "2"
        assert caught.value.code == "rate_limit_exceeded"

        assert app.state.requests_served == 4
        await client.close()
    finally:
        await stop(server, task)
