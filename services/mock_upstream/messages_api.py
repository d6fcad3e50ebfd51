"""Anthropic's Messages API on the mock: ``POST /v1/messages`` (plain and SSE) and
``POST /v1/messages/count_tokens``, with errors in Anthropic's shape.

A request needs ``x-api-key`` (or ``Authorization: Bearer``, as Claude Code sends it) and
``anthropic-version``; the last ones seen are at ``GET /mock/last-request`` (the key only as a SHA-256).
``DELETE /mock/prompt-cache`` forgets every cached prefix.

Input tokens: 3, plus each tool's JSON, plus 3 + text for the system prompt and each message (tokens.py's
counting). ``count_tokens`` returns exactly the total a create call splits into ``input_tokens`` +
``cache_creation_input_tokens`` + ``cache_read_input_tokens``. Prompt caching follows ``cache_control``
breakpoints (on tools, system blocks, message blocks, or top-level for the whole prompt): a prefix seen
within its TTL (``5m`` default, or ``1h``) is read, the rest up to the last breakpoint is written at that
breakpoint's TTL; no minimum cacheable length. The cache directives replace this for one request.
Thinking (``thinking.type`` ``enabled`` or ``adaptive``, or the ``reasoning_tokens`` directive) streams a
thinking block of 8 words (or ``reasoning_tokens``, capped by ``budget_tokens``) before the text; those
tokens count in ``output_tokens``. In a stream ``message_start`` reports ``output_tokens: 1``, as
Anthropic does, and ``message_delta`` the cumulative total: add them and you bill one token too many.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.mock_upstream.directives import Directives
from services.mock_upstream.errors import BadRequest, JSONResponse, error_response, refusal
from services.mock_upstream.intake import admit, directives, optional_int, read_body
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import DEFAULT_COMPLETION_WORDS, content_text, count_tokens, words_for
from services.mock_upstream.usage import TokenCounts, split_input

DEFAULT_THINKING_WORDS = 8
TTL_S = {"5m": 300.0, "1h": 3600.0}
REQUEST_TIERS = {"auto", "standard_only"}


def _block_text(block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind == "tool_use":
        return f"{block.get('name', '')} {orjson.dumps(block.get('input', {})).decode()}"
    if kind == "tool_result":
        return content_text(block.get("content"))
    return ""  # images, documents, redacted thinking: no countable text in the mock


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content):
        return content
    raise BadRequest(f"{where}: content must be a string or an array of content blocks.")


@dataclass(frozen=True, slots=True)
class Prompt:
    total: int
    breakpoints: list[tuple[int, str, bytes]]  # (tokens up to and including the block, ttl, prefix key)
    last_user: str


def prompt_of(body: dict[str, Any]) -> Prompt:
    """Count the prompt tools -> system -> messages, noting each cache_control breakpoint's prefix."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages: must be a non-empty array of message objects.")
    running = hashlib.blake2b(model.encode(), digest_size=16)
    total = 3
    breakpoints: list[tuple[int, str, bytes]] = []

    def add(tokens: int, text: str, cache_control: Any) -> None:
        nonlocal total
        total += tokens
        running.update(text.encode() + b"\x00")
        if isinstance(cache_control, dict):
            ttl = cache_control.get("ttl", "5m")
            if ttl not in TTL_S:
                raise BadRequest("cache_control.ttl: must be '5m' or '1h'.")
            breakpoints.append((total, ttl, running.copy().digest()))

    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("tools: must be an array of tool objects.")
    for tool in tools:
        text = orjson.dumps({k: v for k, v in tool.items() if k != "cache_control"}, option=orjson.OPT_SORT_KEYS)
        add(count_tokens(text.decode()), text.decode(), tool.get("cache_control"))
    system = body.get("system")
    if system is not None:
        add(3, "system", None)
        for block in _blocks(system, "system"):
            text = _block_text(block)
            add(count_tokens(text), text, block.get("cache_control"))
    last_user = ""
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant'.")
        add(3, role, None)
        texts = []
        for block in _blocks(m.get("content"), f"messages.{i}"):
            text = _block_text(block)
            texts.append(text)
            add(count_tokens(text), text, block.get("cache_control"))
        if role == "user":
            last_user = " ".join(texts)
    if isinstance(body.get("cache_control"), dict):  # automatic caching: the whole prompt is the prefix
        add(0, "", body["cache_control"])
    return Prompt(total, breakpoints, last_user)


def _cache_split(prompt: Prompt, cache: dict[bytes, float]) -> tuple[int, int, int]:
    """(read, write 5m, write 1h): the longest live prefix is read, each later breakpoint's stretch is
    written at its own TTL; reading a prefix refreshes its TTL, as Anthropic's cache does."""
    now = time.monotonic()
    read_upto, first_new = 0, 0
    for i, (upto, ttl, key) in enumerate(prompt.breakpoints):
        if cache.get(key, 0.0) > now:
            read_upto, first_new = upto, i + 1
            cache[key] = now + TTL_S[ttl]
    written = {"5m": 0, "1h": 0}
    start = read_upto
    for upto, ttl, key in prompt.breakpoints[first_new:]:
        written[ttl] += upto - start
        start = upto
        cache[key] = now + TTL_S[ttl]
    return read_upto, written["5m"], written["1h"]


def _thinking_words(body: dict[str, Any], d: Directives, max_tokens: int) -> int:
    thinking = body.get("thinking")
    enabled = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget < max_tokens:
            raise BadRequest("thinking.budget_tokens: must be an integer at least 1 and less than max_tokens.")
    else:
        budget = max_tokens
    n = d.reasoning_tokens if d.reasoning_tokens is not None else (DEFAULT_THINKING_WORDS if enabled else 0)
    return min(n, budget)


def _served_tier(body: dict[str, Any], d: Directives) -> str:
    asked = body.get("service_tier")
    if asked is not None and asked not in REQUEST_TIERS:
        raise BadRequest("service_tier: must be 'auto' or 'standard_only'.")
    return d.service_tier or "standard"


def usage_body(t: TokenCounts, tier: str, web_searches: int, *, output_tokens: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": t.uncached_input,
        "cache_creation_input_tokens": t.cache_write,
        "cache_read_input_tokens": t.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": t.cache_write_5m,
            "ephemeral_1h_input_tokens": t.cache_write_1h,
        },
        "output_tokens": t.output if output_tokens is None else output_tokens,
        "service_tier": tier,
    }
    if t.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": t.reasoning}
    if web_searches:
        usage["server_tool_use"] = {"web_search_requests": web_searches, "web_fetch_requests": 0}
    return usage


async def _intake(request: Request) -> tuple[dict[str, Any], Directives] | Response:
    """Auth and version first (as Anthropic checks them), then the body, directives and injected faults."""
    state = request.app.state
    state.requests_served += 1
    h = request.headers
    key = h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer ").strip() or None
    state.last_request = {
        "path": request.url.path,
        "query": request.url.query,
        "anthropic-version": h.get("anthropic-version"),
        "anthropic-beta": h.get("anthropic-beta"),
        "api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
        "auth": "x-api-key" if h.get("x-api-key") else ("bearer" if key else None),
    }
    if key is None:
        return error_response(401, "x-api-key header is required", shape="anthropic")
    if not h.get("anthropic-version"):
        return error_response(400, "anthropic-version: header is required", shape="anthropic")
    try:
        body = await read_body(request)
        d = directives(request, body)
    except BadRequest as e:
        return refusal(e, "anthropic")
    failure = await admit(request, d, shape="anthropic")
    return failure if failure is not None else (body, d)


async def count_message_tokens(request: Request) -> Response:
    taken = await _intake(request)
    if isinstance(taken, Response):
        return taken
    body, d = taken
    try:
        prompt = prompt_of(body)
    except BadRequest as e:
        return refusal(e, "anthropic")
    return JSONResponse({"input_tokens": prompt.total if d.input_tokens is None else d.input_tokens})


@dataclass(frozen=True, slots=True)
class Answer:
    message: dict[str, Any]  # final, as a plain call returns it
    thinking: list[str]
    words: list[str]
    tokens: TokenCounts


def _answer(request: Request, body: dict[str, Any], d: Directives) -> Answer:
    prompt = prompt_of(body)
    max_tokens = optional_int(body, "max_tokens")
    if max_tokens is None or max_tokens < 1:
        raise BadRequest("max_tokens: Field required (an integer of at least 1).")
    thinking_n = _thinking_words(body, d, max_tokens)
    tier = _served_tier(body, d)
    cached = (0, 0, 0) if d.steers_cache else _cache_split(prompt, request.app.state.prompt_cache)
    total, read, w5, w1h = split_input(prompt.total, d, cache_read=cached[0], cache_write_5m=cached[1],
                                       cache_write_1h=cached[2])  # fmt: skip
    wanted = DEFAULT_COMPLETION_WORDS if d.stream_chunks is None else max(0, d.stream_chunks)
    words = words_for(prompt.last_user, min(wanted, max_tokens - thinking_n))
    thinking = words_for("thinking\x00" + prompt.last_user, thinking_n)
    tokens = TokenCounts(total, read, w5, w1h, len(words), len(thinking))
    omitted = isinstance(body.get("thinking"), dict) and body["thinking"].get("display") == "omitted"
    content: list[dict[str, Any]] = []
    if thinking:
        text = "" if omitted else " ".join(thinking)
        content.append({"type": "thinking", "thinking": text, "signature": _signature(thinking)})
    content.append({"type": "text", "text": " ".join(words)})
    message = {
        "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body["model"],
        "content": content, "stop_reason": "max_tokens" if len(words) < wanted else "end_turn",
        "stop_sequence": None, "usage": usage_body(tokens, tier, d.web_search_requests),
    }  # fmt: skip
    return Answer(message, [] if omitted else thinking, words, tokens)


def _signature(thinking: list[str]) -> str:
    return hashlib.blake2b(" ".join(thinking).encode(), digest_size=24).hexdigest()


async def create_message(request: Request) -> Response:
    taken = await _intake(request)
    if isinstance(taken, Response):
        return taken
    body, d = taken
    try:
        answer = _answer(request, body, d)
    except BadRequest as e:
        return refusal(e, "anthropic")
    headers = {"request-id": f"req_{uuid.uuid4().hex}"}
    if body.get("stream") is True:
        settings: MockSettings = request.app.state.settings
        delay_ms = settings.mock_stream_chunk_delay_ms if d.chunk_delay_ms is None else d.chunk_delay_ms
        events = stream_events(answer, d, delay_ms / 1000, request.app.state)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    message = answer.message
    if not d.usage:
        message = {k: v for k, v in message.items() if k != "usage"}
    return JSONResponse(message, headers=headers)


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


async def stream_events(answer: Answer, d: Directives, delay_s: float, state: Any) -> AsyncIterator[bytes]:
    """message_start, ping, a thinking block (thinking_delta..., signature_delta), a text block
    (text_delta...), message_delta with the cumulative usage, message_stop."""
    message, t = answer.message, answer.tokens
    usage = message["usage"]
    tier = usage["service_tier"]
    start_usage = usage_body(t, tier, d.web_search_requests, output_tokens=min(1, t.output))
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    if not d.usage:
        del start["usage"]
    yield _sse("message_start", {"message": start})
    yield _sse("ping", {})
    sent = 0

    async def delta(index: int, body: dict[str, Any]) -> bytes | None:
        nonlocal sent
        if d.disconnect_after_chunks is not None and sent >= d.disconnect_after_chunks:
            return None
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        sent += 1
        state.chunks_sent += 1
        return _sse("content_block_delta", {"index": index, "delta": body})

    index = 0
    for block in message["content"]:
        if block["type"] == "thinking":
            yield _sse(
                "content_block_start", {"index": index, "content_block": {**block, "thinking": "", "signature": ""}}
            )
            for i, word in enumerate(answer.thinking):
                chunk = await delta(index, {"type": "thinking_delta", "thinking": word if i == 0 else " " + word})
                if chunk is None:
                    return  # cut: no block stop, no message_delta usage, no message_stop
                yield chunk
            yield _sse(
                "content_block_delta",
                {"index": index, "delta": {"type": "signature_delta", "signature": block["signature"]}},
            )
        else:
            yield _sse("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
            for i, word in enumerate(answer.words):
                chunk = await delta(index, {"type": "text_delta", "text": word if i == 0 else " " + word})
                if chunk is None:
                    return
                yield chunk
        yield _sse("content_block_stop", {"index": index})
        index += 1
    final_usage: dict[str, Any] = {
        "input_tokens": usage["input_tokens"],
        "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
        "cache_read_input_tokens": usage["cache_read_input_tokens"],
        "output_tokens": usage["output_tokens"],
    }
    for extra in ("output_tokens_details", "server_tool_use"):
        if extra in usage:
            final_usage[extra] = usage[extra]
    delta_body: dict[str, Any] = {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None}}
    if d.usage:  # usage: false is a provider that reports no counts at all, not one that reports zeros
        delta_body["usage"] = final_usage
    yield _sse("message_delta", delta_body)
    yield _sse("message_stop", {})


async def forget_prompt_cache(request: Request) -> Response:
    """DELETE /mock/prompt-cache: every cached prefix is gone, so tests sharing one mock start cold."""
    forgotten = len(request.app.state.prompt_cache)
    request.app.state.prompt_cache.clear()
    return JSONResponse({"forgotten": forgotten})


async def last_request(request: Request) -> Response:
    return JSONResponse(request.app.state.last_request)
