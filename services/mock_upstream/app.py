"""The mock upstream's HTTP surface: chat, embeddings and models here; the Responses API (responses_api.py)
and Anthropic's Messages API (messages_api.py) beside it; faults and usage steered by directives.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from services.mock_upstream import messages_api, responses_api
from services.mock_upstream.errors import BadRequest, JSONResponse, error_response
from services.mock_upstream.intake import admit, directives, optional_int, read_body
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import (
    DEFAULT_COMPLETION_WORDS,
    completion_text,
    count_tokens,
    prompt_tokens_for_messages,
)
from services.mock_upstream.usage import TokenCounts, split_input

MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "mock-chat")
EMBEDDING_DIMENSIONS = 8


def _usage(t: TokenCounts) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": t.input_total,
        "completion_tokens": t.output,
        "total_tokens": t.input_total + t.output,
        "prompt_tokens_details": {"cached_tokens": t.cache_read},
    }
    if t.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": t.reasoning}
    return usage


async def chat_completions(request: Request) -> Response:
    request.app.state.requests_served += 1
    try:
        body = await read_body(request)
        d = directives(request, body)
    except BadRequest as e:
        return error_response(400, e.message)
    failure = await admit(request, d)
    if failure is not None:
        return failure

    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        return error_response(400, "you must provide a model parameter", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return error_response(400, "'messages' must be a non-empty array of objects.")
    try:
        max_tokens = optional_int(body, "max_completion_tokens", "max_tokens")
    except BadRequest as e:
        return error_response(400, e.message)

    wanted = DEFAULT_COMPLETION_WORDS if d.stream_chunks is None else max(0, d.stream_chunks)
    words = completion_text(messages, max_tokens, words=wanted)
    finish_reason = "length" if len(words) < wanted else "stop"
    total, read, _, _ = split_input(prompt_tokens_for_messages(messages), d)
    # every vocabulary word is exactly one token, so len(words) equals count_tokens(" ".join(words))
    tokens = TokenCounts(total, read, 0, 0, len(words), d.reasoning_tokens or 0)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        usage = _usage(tokens) if include_usage and d.usage else None
        settings: MockSettings = request.app.state.settings
        delay_ms = settings.mock_stream_chunk_delay_ms if d.chunk_delay_ms is None else d.chunk_delay_ms
        events = _stream_events(
            completion_id, created, model, words, finish_reason, include_usage, usage,
            delay_ms / 1000, d.disconnect_after_chunks, request.app.state,
        )  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    response: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
    }
    if d.usage:
        response["usage"] = _usage(tokens)
    return JSONResponse(response)


async def _stream_events(
    completion_id: str,
    created: int,
    model: str,
    words: list[str],
    finish_reason: str,
    include_usage: bool,
    usage: dict[str, Any] | None,
    delay_s: float,
    disconnect_after: int | None,
    state: Any = None,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk sequence: role, one chunk per word, an empty delta with finish_reason,
    then (include_usage) a choices-less usage chunk, then [DONE]."""
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def event(delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None  # OpenAI sends an explicit null on every chunk but the last
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    yield event({"role": "assistant", "content": "", "refusal": None}, None)
    for i, word in enumerate(words):
        if disconnect_after is not None and i >= disconnect_after:
            return  # the stream just ends: no finish_reason, no usage, no [DONE]
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if state is not None:
            state.chunks_sent += 1  # lets a test see that a proxy stopped reading when its client left
        yield event({"content": word if i == 0 else " " + word}, None)
    yield event({}, finish_reason)
    if usage is not None:
        yield b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def embedding_vector(item: str | list[int], dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """Deterministic values k/128 - 1: exact in float32, so the base64 encoding round-trips."""
    key = item.encode() if isinstance(item, str) else ",".join(map(str, item)).encode()
    digest = hashlib.blake2b(key, digest_size=64).digest()
    return [((digest[i % 64] + 7 * (i // 64)) % 256) / 128 - 1 for i in range(dimensions)]


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    def is_tokens(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(raw, str):
        return [raw]
    if is_tokens(raw):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(v, str) or is_tokens(v) for v in raw):
        return raw
    raise BadRequest("'input' must be a string, an array of strings, or an array of token arrays.")


async def embeddings(request: Request) -> Response:
    request.app.state.requests_served += 1
    try:
        body = await read_body(request)
        d = directives(request, body)
        failure = await admit(request, d)
        if failure is not None:
            return failure
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error_response(400, "you must provide a model parameter", code="missing_required_parameter")
        items = _embedding_inputs(body.get("input"))
        dimensions = optional_int(body, "dimensions") or EMBEDDING_DIMENSIONS
        if not 1 <= dimensions <= 4096:
            raise BadRequest("'dimensions' must be between 1 and 4096.")
    except BadRequest as e:
        return error_response(400, e.message)
    as_base64 = body.get("encoding_format") == "base64"  # the openai SDK asks for base64 by default
    data = []
    tokens = 0
    for i, item in enumerate(items):
        tokens += count_tokens(item) if isinstance(item, str) else len(item)
        vector: Any = embedding_vector(item, dimensions)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    response: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if d.usage:
        response["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse(response)


async def list_models(request: Request) -> Response:
    if request.app.state.fault_status is not None:  # an outage takes the whole provider down, probes included
        return error_response(request.app.state.fault_status, "Mock upstream outage.")
    created = request.app.state.started_at
    data = [{"id": m, "object": "model", "created": created, "owned_by": "tollway-mock"} for m in MODELS]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> Response:
    state = request.app.state
    if request.method == "DELETE":
        state.requests_served = 0
        state.fail_keys = {}
        state.chunks_sent = 0
    return JSONResponse({"requests_served": state.requests_served, "fail_keys": state.fail_keys})


async def fault(request: Request) -> Response:
    """PUT {"status": 503} starts a provider-wide outage (every call and /models fail), DELETE ends it."""
    state = request.app.state
    if request.method == "PUT":
        try:
            status = int(orjson.loads(await request.body())["status"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return error_response(400, 'body must be {"status": <int>}')
        state.fault_status = status if status >= 400 else None
    elif request.method == "DELETE":
        state.fault_status = None
    return JSONResponse({"status": state.fault_status})


async def stream_stats(request: Request) -> Response:
    return JSONResponse({"chunks_sent": request.app.state.chunks_sent})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail or "Error", code="not_found" if exc.status_code == 404 else None)


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, f"Mock upstream error: {type(exc).__name__}")


def create_app(settings: MockSettings) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/responses", responses_api.create_response, methods=["POST"]),
            Route("/v1/responses/{response_id}", responses_api.retrieve_response, methods=["GET"]),
            Route("/v1/responses/{response_id}", responses_api.delete_response, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/cancel", responses_api.cancel_response, methods=["POST"]),
            Route("/v1/responses/{response_id}/input_items", responses_api.list_input_items, methods=["GET"]),
            Route("/v1/messages", messages_api.create_message, methods=["POST"]),
            Route("/v1/messages/count_tokens", messages_api.count_message_tokens, methods=["POST"]),
            Route("/mock/last-request", messages_api.last_request, methods=["GET"]),
            Route("/mock/prompt-cache", messages_api.forget_prompt_cache, methods=["DELETE"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/mock/stats", stats, methods=["GET", "DELETE"]),
            Route("/mock/streams", stream_stats, methods=["GET"]),
            Route("/mock/fault", fault, methods=["GET", "PUT", "DELETE"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.settings = settings
    # seeded so that a run with mock_error_rate > 0 fails the same requests every time
    app.state.rng = random.Random(settings.mock_seed)
    app.state.requests_served = 0  # API requests (chat, embeddings, responses, messages), failed or not
    app.state.fail_keys = {}  # fail_key -> requests seen carrying it
    app.state.chunks_sent = 0  # streamed content chunks, all streams together
    app.state.fault_status = None  # set by PUT /mock/fault: every call fails with it until DELETE
    app.state.started_at = int(time.time())
    app.state.responses = {}  # response id -> responses_api.StoredResponse
    app.state.prompt_cache = {}  # Messages cache_control prefix key -> monotonic expiry
    app.state.last_request = None  # the last Messages request's forwarded headers (key only as a hash)
    return app
