"""The request path, top to bottom: authenticate -> parse -> route -> forward -> respond -> emit event."""

from __future__ import annotations

import time
from typing import Any

import orjson
import uuid_utils
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from schemas.events import utc_now
from services.proxy import metrics
from services.proxy.auth import authenticate
from services.proxy.errors import GatewayError, InvalidRequest, PayloadTooLarge, error_response
from services.proxy.routing import ModelRoute
from services.proxy.streaming import StreamOutcome, relay
from services.proxy.upstream import open_stream, post_json, upstream_failure

CHAT = "chat.completions"
EMBEDDINGS = "embeddings"


class Call:
    """What one request accumulates on its way; becomes the usage event at the end."""

    __slots__ = ("endpoint", "event", "request_id", "started")

    def __init__(self, request: Request, endpoint: str) -> None:
        self.started = time.perf_counter()
        self.request_id = request.headers.get("x-request-id") or f"req_{uuid_utils.uuid7().hex}"
        self.endpoint = endpoint
        self.event: dict[str, Any] = {
            "event_id": str(uuid_utils.uuid7()),
            "occurred_at": utc_now(),
            "request_id": self.request_id[:200],
            "endpoint": endpoint,
            "requested_model": "",
            "status": "error",
            "http_status": 0,
        }

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


async def read_body(request: Request, max_bytes: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"Request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return body


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a string 'role'.", code="invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(field)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise InvalidRequest(f"'{field}' must be a non-negative integer.")


def validate_embeddings(body: dict[str, Any]) -> None:
    inp = body.get("input")
    ok = isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(x, (str, int, list)) for x in inp))
    if not ok:
        raise InvalidRequest("'input' must be a string or a non-empty array.", code="invalid_input")


def usage_fields(data: Any) -> dict[str, int] | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cached_tokens": int(cached or 0),
    }


def estimate_tokens(body: dict[str, Any], completion_chars: int = 0) -> dict[str, int]:
    """A provider that reports no usage is still billed: ~4 characters per token, marked as estimated."""
    prompt_chars = len(orjson.dumps(body.get("messages") or body.get("input") or ""))
    return {"prompt_tokens": max(1, prompt_chars // 4), "completion_tokens": (completion_chars + 3) // 4,
            "cached_tokens": 0}  # fmt: skip


class ProxyHandler:
    """Holds what every request needs (built once in the lifespan) and serves the OpenAI endpoints."""

    def __init__(self, state: Any) -> None:
        self.s = state  # app.state: settings, view, router, http, emitter

    def finish(self, call: Call, status: int, route: ModelRoute | None = None) -> None:
        ev = call.event
        ev["http_status"] = status
        ev["latency_ms"] = round(call.elapsed_ms(), 3)
        if "team_id" in ev:  # only calls that got past auth are events
            self.s.emitter.emit(ev)
            metrics.EVENTS_QUEUED.set(self.s.emitter.queued)
        model = ev.get("served_model") or ev.get("requested_model") or "unknown"
        metrics.REQUESTS.labels(
            call.endpoint, model if route else "unknown", ev.get("provider", ""), ev["status"]
        ).inc()
        metrics.LATENCY.labels(call.endpoint).observe(ev["latency_ms"] / 1000)

    def fail(self, call: Call, err: GatewayError) -> Response:
        call.event["status"] = "error"
        call.event["error_code"] = err.code
        self.finish(call, err.status)
        return error_response(err, call.request_id)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, CHAT, "/chat/completions", "chat")

    async def embeddings(self, request: Request) -> Response:
        return await self._serve(request, EMBEDDINGS, "/embeddings", "embedding")

    async def _serve(self, request: Request, endpoint: str, path: str, kind: str) -> Response:
        call = Call(request, endpoint)
        ev = call.event
        try:
            key = authenticate(request, self.s.view)
            ev["team_id"], ev["key_id"] = key.team_id, key.key_id
            ev["metadata"] = dict(key.metadata)
            body = await read_body(request, self.s.settings.max_body_bytes)
            ev["requested_model"] = str(body.get("model", ""))[:256]
            if isinstance(body.get("user"), str):
                ev["end_user"] = body["user"][:256]
            (validate_chat if kind == "chat" else validate_embeddings)(body)
            route = self.s.router.resolve(body.get("model"), kind)
            target = route.targets[0]
            ev["served_model"], ev["provider"] = route.name, target.provider
            upstream_body = {**body, "model": target.upstream_model}
            if kind == "chat" and body.get("stream"):
                return await self._stream(call, route, target, body, upstream_body)
            t_up = time.perf_counter()
            ev["attempts"] = 1
            reply = await post_json(self.s.http, target, path, orjson.dumps(upstream_body))
            up_s = time.perf_counter() - t_up
            metrics.UPSTREAM_LATENCY.labels(target.provider).observe(up_s)
            if reply.status >= 400:
                raise upstream_failure(reply.status, reply.body, reply.data)
        except GatewayError as err:
            return self.fail(call, err)
        usage = usage_fields(reply.data)
        if usage is None:
            usage, ev["usage_source"] = estimate_tokens(body), "estimated"
        ev.update(usage)
        ev["status"] = "ok"
        metrics.TOKENS.labels(route.name, "prompt").inc(usage["prompt_tokens"])
        metrics.TOKENS.labels(route.name, "completion").inc(usage["completion_tokens"])
        metrics.ADDED_LATENCY.observe(max(0.0, call.elapsed_ms() / 1000 - up_s))
        self.finish(call, reply.status, route)
        return Response(reply.body, status_code=reply.status, media_type="application/json",
                        headers={"x-request-id": call.request_id})  # fmt: skip

    async def _stream(self, call: Call, route: ModelRoute, target: Any, body: dict, upstream_body: dict) -> Response:
        ev = call.event
        ev["stream"] = True
        ev["attempts"] = 1
        opts = body.get("stream_options")
        wants_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        upstream_body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        resp = await open_stream(self.s.http, target, "/chat/completions", orjson.dumps(upstream_body))

        def on_end(out: StreamOutcome) -> None:
            if out.usage_seen:
                ev.update(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                          cached_tokens=out.cached_tokens)  # fmt: skip
            else:
                ev.update(estimate_tokens(body, out.content_chars))
                ev["usage_source"] = "estimated"
            ev["ttft_ms"] = round(out.ttft_ms, 3) if out.ttft_ms is not None else None
            ev["client_disconnected"] = not out.completed and not out.upstream_broken
            ev["status"] = "ok" if out.completed else "error"
            if out.upstream_broken:
                ev["error_code"] = "upstream_stream_broken"
            self.finish(call, 200, route)

        out = StreamOutcome()
        return StreamingResponse(
            relay(resp, call.started, wants_usage, out, on_end),
            media_type="text/event-stream",
            headers={"x-request-id": call.request_id, "cache-control": "no-cache"},
        )

    async def models(self, request: Request) -> Response:
        call = Call(request, "models")
        try:
            authenticate(request, self.s.view)
        except GatewayError as err:
            return error_response(err, call.request_id)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "tollway"} for n in self.s.router.public_names]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
