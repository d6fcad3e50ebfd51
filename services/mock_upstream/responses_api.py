"""OpenAI's Responses API on the mock: ``POST /v1/responses`` (plain and typed SSE events), the stored
response's follow-ups (GET, DELETE, cancel, input_items) and ``previous_response_id`` chaining.

Usage is derived from the request like chat's (tokens.py) and steered by the same directives:
``input_tokens`` counts ``instructions`` + the chained context of ``previous_response_id`` + ``input``;
``cached_tokens`` lands in ``input_tokens_details`` (cache writes are plain input there, as OpenAI
reports them); ``reasoning_tokens`` (default 8 when the request sets ``reasoning.effort``
other than ``none``) adds a reasoning output item and counts inside ``output_tokens``. ``service_tier``
is served as asked (``auto`` -> ``default``, ``fast`` -> ``priority``) unless the directive says otherwise.
``background: true`` answers ``queued``; the response completes at its first GET unless cancelled first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.mock_upstream.directives import Directives
from services.mock_upstream.errors import BadRequest, JSONResponse, error_response, refusal
from services.mock_upstream.intake import admit, directives, optional_int, read_body
from services.mock_upstream.settings import MockSettings
from services.mock_upstream.tokens import DEFAULT_COMPLETION_WORDS, completion_text, prompt_tokens_for_messages
from services.mock_upstream.usage import TokenCounts, split_input

DEFAULT_REASONING_TOKENS = 8
SERVICE_TIERS = {"auto": "default", "default": "default", "flex": "flex", "scale": "scale",
                 "priority": "priority", "fast": "priority", "ultrafast": "ultrafast"}  # fmt: skip
_TEXT_PART_TYPES = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the finished response, as GET returns it
    input_items: list[dict[str, Any]]  # this request's input, with ids, in order
    context: list[dict[str, Any]]  # chat-style messages a follow-up's previous_response_id inherits
    pending: bool = False  # background: queued until its first GET or a cancel
    queued: dict[str, Any] = field(default_factory=dict)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _item_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in _TEXT_PART_TYPES
        )
    raise BadRequest("'content' must be a string or an array of content parts.", param="input")


def _input_items(raw: Any) -> list[dict[str, Any]]:
    """The request's ``input`` as stored items (each with an id), as ``input_items`` lists them."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        raise BadRequest("'input' must be a string or an array of input items.", param="input")
    items = []
    for item in raw:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest("Each input message needs a 'role' of user, assistant, system or developer.")
            content = item.get("content")
            parts = (
                [{"type": "input_text" if role != "assistant" else "output_text", "text": content}]
                if isinstance(content, str)
                else content
            )
            _item_text(parts)  # validates
            items.append({"id": item.get("id") or _new_id("msg"), "type": "message", "role": role,
                          "content": parts, "status": "completed"})  # fmt: skip
        else:
            items.append({**item, "id": item.get("id") or _new_id("item")})
    return items


def _as_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-style messages, so a Responses prompt counts tokens by the same recipe as chat."""
    messages = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            messages.append({"role": item["role"], "content": _item_text(item["content"])})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": output if isinstance(output, str) else _item_text(output)})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": str(item.get("arguments", ""))})
        # reasoning and tool-call items carry no countable text for the mock
    return messages


def _served_tier(body: dict[str, Any], d: Directives) -> str:
    if d.service_tier is not None:
        return d.service_tier
    asked = body.get("service_tier")
    if asked is None:
        return "default"
    if asked not in SERVICE_TIERS:
        raise BadRequest(f"Invalid service_tier {asked!r}.", param="service_tier")
    return SERVICE_TIERS[asked]


def _reasoning_tokens(body: dict[str, Any], d: Directives) -> int:
    if d.reasoning_tokens is not None:
        return d.reasoning_tokens
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") not in (None, "none"):
        return DEFAULT_REASONING_TOKENS
    return 0


def usage_body(t: TokenCounts) -> dict[str, Any]:
    return {
        "input_tokens": t.input_total,
        # OpenAI's shape: cache reads only. OpenAI bills no cache writes (a write is plain input), so a cache-write
        # directive on this API stays inside input_tokens, unreported, as the real API would leave it.
        "input_tokens_details": {"cached_tokens": t.cache_read},
        "output_tokens": t.output,
        "output_tokens_details": {"reasoning_tokens": t.reasoning},
        "total_tokens": t.input_total + t.output,
    }


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one create call answers, decided before the first byte is sent."""

    response: dict[str, Any]  # final, as stored and as response.completed carries it
    words: list[str]
    reasoning_item: dict[str, Any] | None
    search_items: list[dict[str, Any]]
    message_id: str


def _plan(
    request: Request, body: dict[str, Any], d: Directives
) -> tuple[Plan, list[dict[str, Any]], list[dict[str, Any]]]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    store: dict[str, StoredResponse] = request.app.state.responses
    previous_id = body.get("previous_response_id")
    previous: list[dict[str, Any]] = []
    if previous_id is not None:
        prior = store.get(previous_id) if isinstance(previous_id, str) else None
        if prior is None:
            raise BadRequest(f"Previous response with id '{previous_id}' not found.", status=404,
                             param="previous_response_id", code="previous_response_not_found")  # fmt: skip
        previous = prior.context
    if body.get("input") is None and previous_id is None:
        raise BadRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    items = _input_items(body.get("input") if body.get("input") is not None else [])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string.", param="instructions")
    max_output = optional_int(body, "max_output_tokens")
    tier = _served_tier(body, d)

    context = previous + _as_messages(items)
    prompt = ([{"role": "developer", "content": instructions}] if instructions else []) + context
    reasoning = _reasoning_tokens(body, d)
    wanted = DEFAULT_COMPLETION_WORDS if d.stream_chunks is None else max(0, d.stream_chunks)
    # reasoning comes first and spends the max_output_tokens budget before any visible word
    budget = None if max_output is None else max(0, max_output - reasoning)
    words = completion_text(prompt, budget, words=wanted)
    total, read, w5, w1h = split_input(prompt_tokens_for_messages(prompt), d)
    spent = reasoning if max_output is None else min(reasoning, max_output)
    tokens = TokenCounts(total, read, w5, w1h, len(words), spent)
    incomplete = len(words) < wanted or spent < reasoning

    reasoning_item = {"id": _new_id("rs"), "type": "reasoning", "summary": []} if tokens.reasoning else None
    query = " ".join(completion_text(prompt, None, words=3))
    search_items = [
        {
            "id": _new_id("ws"),
            "type": "web_search_call",
            "status": "completed",
            "action": {"type": "search", "query": query},
        }
        for _ in range(d.web_search_requests)
    ]
    message_id = _new_id("msg")
    message = {
        "id": message_id, "type": "message", "status": "incomplete" if incomplete else "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": " ".join(words), "annotations": [], "logprobs": []}],
    }  # fmt: skip
    now = int(time.time())
    response = {
        "id": _new_id("resp"), "object": "response", "created_at": now,
        "status": "incomplete" if incomplete else "completed", "background": body.get("background") is True,
        "completed_at": None if incomplete else now, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": instructions, "max_output_tokens": max_output, "metadata": body.get("metadata") or {},
        "model": model, "output": [*([reasoning_item] if reasoning_item else []), *search_items, message],
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": previous_id,
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None}, "service_tier": tier,
        "store": body.get("store", True) is not False, "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
        "usage": usage_body(tokens) if d.usage else None, "user": body.get("user"),
    }  # fmt: skip
    context = [*context, {"role": "assistant", "content": " ".join(words)}]
    return Plan(response, words, reasoning_item, search_items, message_id), items, context


def _record(request: Request) -> None:
    request.app.state.requests_served += 1


async def create_response(request: Request) -> Response:
    _record(request)
    try:
        body = await read_body(request)
        d = directives(request, body)
    except BadRequest as e:
        return refusal(e)
    failure = await admit(request, d)
    if failure is not None:
        return failure
    try:
        plan, items, context = _plan(request, body, d)
    except BadRequest as e:
        return refusal(e)
    response = plan.response
    stored = StoredResponse(response, items, context)
    state = request.app.state

    if body.get("stream") is True:
        if d.disconnect_after_chunks is not None and d.disconnect_after_chunks < len(plan.words):
            # the provider died mid-answer: what a later GET finds is a failed response
            failed = {**response, "status": "failed", "completed_at": None, "usage": None,
                      "error": {"code": "server_error", "message": "The mock upstream cut the stream."}}  # fmt: skip
            stored = StoredResponse(failed, items, context)
        if response["store"]:
            state.responses[response["id"]] = stored
        settings: MockSettings = state.settings
        delay_ms = settings.mock_stream_chunk_delay_ms if d.chunk_delay_ms is None else d.chunk_delay_ms
        events = stream_events(plan, delay_ms / 1000, d.disconnect_after_chunks, state)
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    if response["background"]:
        queued = {**response, "status": "queued", "output": [], "usage": None, "completed_at": None,
                  "incomplete_details": None}  # fmt: skip
        stored.pending, stored.queued = True, queued
        state.responses[response["id"]] = stored  # background responses are always stored
        return JSONResponse(queued)
    if response["store"]:
        state.responses[response["id"]] = stored
    return JSONResponse(response)


def _sse(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    return (
        b"event: "
        + kind.encode()
        + b"\ndata: "
        + orjson.dumps({"type": kind, "sequence_number": seq, **payload})
        + b"\n\n"
    )


async def stream_events(plan: Plan, delay_s: float, disconnect_after: int | None, state: Any) -> AsyncIterator[bytes]:
    """The typed event sequence the openai SDK's ResponseStream accumulates, numbered from 0."""
    final = plan.response
    seq = iter(range(1 << 30))
    opening = {**final, "status": "in_progress", "output": [], "usage": None, "completed_at": None,
               "incomplete_details": None}  # fmt: skip
    yield _sse("response.created", next(seq), {"response": opening})
    yield _sse("response.in_progress", next(seq), {"response": opening})
    index = 0
    for item in [*([plan.reasoning_item] if plan.reasoning_item else []), *plan.search_items]:
        yield _sse("response.output_item.added", next(seq), {"output_index": index, "item": item})
        yield _sse("response.output_item.done", next(seq), {"output_index": index, "item": item})
        index += 1
    message = final["output"][index]
    where = {"item_id": plan.message_id, "output_index": index, "content_index": 0}
    added = {**message, "status": "in_progress", "content": []}
    yield _sse("response.output_item.added", next(seq), {"output_index": index, "item": added})
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield _sse("response.content_part.added", next(seq), {**where, "part": empty})
    for i, word in enumerate(plan.words):
        if disconnect_after is not None and i >= disconnect_after:
            return  # the stream just ends: no done events, no response.completed, no usage
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        state.chunks_sent += 1
        yield _sse(
            "response.output_text.delta", next(seq), {**where, "delta": word if i == 0 else " " + word, "logprobs": []}
        )
    part = message["content"][0]
    yield _sse("response.output_text.done", next(seq), {**where, "text": part["text"], "logprobs": []})
    yield _sse("response.content_part.done", next(seq), {**where, "part": part})
    yield _sse("response.output_item.done", next(seq), {"output_index": index, "item": message})
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield _sse(kind, next(seq), {"response": final})


async def _stored(request: Request) -> tuple[StoredResponse | None, Response | None]:
    """The stored response a follow-up names, after the same latency and fault injection as a create."""
    _record(request)
    try:
        d = directives(request, None)
    except BadRequest as e:
        return None, refusal(e)
    failure = await admit(request, d)
    if failure is not None:
        return None, failure
    rid = request.path_params["response_id"]
    stored = request.app.state.responses.get(rid)
    if stored is None:
        return None, error_response(404, f"Response with id '{rid}' not found.", code="not_found")
    return stored, None


async def retrieve_response(request: Request) -> Response:
    stored, failure = await _stored(request)
    if stored is None:
        return failure  # type: ignore[return-value]
    stored.pending = False  # a background response finishes by the time anyone looks
    return JSONResponse(stored.response)


async def delete_response(request: Request) -> Response:
    stored, failure = await _stored(request)
    if stored is None:
        return failure  # type: ignore[return-value]
    rid = stored.response["id"]
    del request.app.state.responses[rid]
    return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})


async def cancel_response(request: Request) -> Response:
    stored, failure = await _stored(request)
    if stored is None:
        return failure  # type: ignore[return-value]
    if not stored.response["background"]:
        return error_response(400, "Only responses created with background=true can be cancelled.")
    if stored.pending:
        # nothing was generated, so nothing is billed: no output, no usage
        stored.response = {**stored.queued, "status": "cancelled"}
        stored.pending = False
    elif stored.response["status"] != "cancelled":
        return error_response(400, f"Cannot cancel a response with status '{stored.response['status']}'.")
    return JSONResponse(stored.response)


async def list_input_items(request: Request) -> Response:
    stored, failure = await _stored(request)
    if stored is None:
        return failure  # type: ignore[return-value]
    q = request.query_params
    order = q.get("order", "desc")
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        limit = 0
    if order not in ("asc", "desc") or not 1 <= limit <= 100:
        return error_response(400, "'order' must be asc or desc and 'limit' between 1 and 100.")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    after = q.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            return error_response(400, f"No input item with id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSONResponse({
        "object": "list", "data": page, "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
    })  # fmt: skip
