"""Anthropic's Messages API on the gateway: `POST /v1/messages` (plain and streamed) and
`POST /v1/messages/count_tokens`, routed only to providers that speak it natively (api: anthropic).

The same life as a chat call (services/proxy/handler.py), through the same steps of ProxyHandler:
authenticate -> parse -> admit (limits, quota) -> route -> cache -> forward (retry/fallback) -> respond ->
emit event; errors in Anthropic's shape. Usage is normalized by anthropic_usage.py, streams relayed by
anthropic_stream.py. count_tokens is limited by rpm/rpd but neither reserved nor billed: its event carries
zero tokens (endpoint messages.count_tokens), so the call is still seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from typing import Any

import orjson
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from services.proxy import metrics
from services.proxy.anthropic_stream import MessageAssembler, MessagesRelay, replay_events
from services.proxy.anthropic_usage import message_usage, output_chars
from services.proxy.attribution import attribute
from services.proxy.auth import authenticate
from services.proxy.cache import Entry, cache_key
from services.proxy.draft import UsageDraft
from services.proxy.errors import GatewayError, InvalidRequest, Shape, UsageUnrecordable
from services.proxy.forward import forward
from services.proxy.handler import (
    MAX_TOKENS_CAP,
    Call,
    JSONBytes,
    ProxyHandler,
    _count,
    check_output_cap,
    read_body,
)
from services.proxy.limits import Policy
from services.proxy.routing import ModelRoute, Target
from services.proxy.streaming import SSEResponse, iterate
from services.proxy.tokens import CHARS_PER_TOKEN, TokenUsage, estimate_usage
from services.proxy.upstream import UpstreamReply, open_stream, post_json, upstream_failure

log = structlog.get_logger("tollway.proxy.messages")

MESSAGES = "messages"
COUNT_TOKENS = "messages.count_tokens"
SHAPE: Shape = "anthropic"
# the caller's headers passed on to the provider (Claude Code needs both); the Target's default
# anthropic-version applies when the caller sends none. Nothing else of the caller's, never its key.
PASSED_ON = {"anthropic-version": 64, "anthropic-beta": 2048}  # header -> longest value accepted
MAX_MESSAGES = 100_000  # Anthropic's own bound on messages per request


def anthropic_call(request: Request, endpoint: str) -> Call:
    call = Call(request, endpoint)
    call.headers["request-id"] = call.request_id  # where Anthropic's SDKs read it (`_request_id`, error logs)
    return call


def validate_messages(body: dict[str, Any], count_only: bool = False) -> None:
    """What must hold before any upstream work (400 invalid_request_error); the provider checks the rest."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", code="invalid_messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"'messages' holds more than {MAX_MESSAGES} items.", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a string 'role'.", code="invalid_messages")
        if not isinstance(m.get("content"), (str, list)):
            raise InvalidRequest(f"'messages[{i}].content' must be a string or an array of content blocks.",
                                 code="invalid_messages")  # fmt: skip
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise InvalidRequest("'system' must be a string or an array of text blocks.")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise InvalidRequest("'tools' must be an array.")
    if count_only:
        return
    # required, and bounded: the quota reserves max_tokens before the call
    mt = body.get("max_tokens")
    if mt is None:
        raise InvalidRequest("'max_tokens' is required.", code="invalid_value")
    _count(body, "max_tokens", 1, MAX_TOKENS_CAP)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.")
    _count(body, "top_k", 0, 1_000_000)
    for field in ("temperature", "top_p"):
        v = body.get(field)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise InvalidRequest(f"'{field}' must be a number.")


def passed_on(request: Request) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for name, longest in PASSED_ON.items():
        v = request.headers.get(name)
        if v is None:
            continue
        if len(v) > longest or not v.isascii() or not v.isprintable():
            raise InvalidRequest(f"The '{name}' header must be printable ASCII of at most {longest} characters.")
        out[name] = v
    return out or None


def _without_tpm(policy: Policy) -> Policy:
    return dataclasses.replace(policy, rules=tuple(r for r in policy.rules if r.metric != "tpm"))


def _attempt(h: ProxyHandler, body: dict[str, Any], raw: bytes, path: str, headers: dict[str, str] | None) -> Any:
    requested = body.get("model")

    async def attempt(target: Target, budget_s: float) -> UpstreamReply:
        payload = raw if requested == target.upstream_model else orjson.dumps({**body, "model": target.upstream_model})
        reply = await post_json(h.s.plain, target, path, payload, budget_s, headers)
        if reply.status >= 300:
            raise upstream_failure(reply.status, reply.body, reply.data, reply.retry_after, target.provider)
        return reply

    return attempt


async def create(h: ProxyHandler, request: Request) -> Response:
    """POST /v1/messages."""
    call = anthropic_call(request, MESSAGES)
    d = call.draft
    route: ModelRoute | None = None
    body: dict[str, Any] = {}
    try:
        key = authenticate(request, h.s.view)
        d.team_id, d.key_id = key.team_id, key.key_id
        d.metadata = dict(key.metadata)
        body, raw = await read_body(request, h.s.settings.max_body_bytes)
        call.body_bytes = len(raw)
        d.requested_model = str(body.get("model", ""))[:256]
        d.end_user, d.metadata = attribute(body, request.scope["headers"], key.metadata)
        validate_messages(body)
        headers = passed_on(request)
        policy = h.policy(key)
        await h.admit(call, key, policy, body)
        route = h.s.router.resolve(body.get("model"), MESSAGES, policy.models)
        d.served_model = route.name
        check_output_cap(body, route)
        stream = body.get("stream") is True
        d.stream = stream
        use = h.cache_use(request, body, route.kind, route)
        if use.write or use.read:
            call.cache_key = cache_key(key.team_id, route.name, MESSAGES, body)
            if use.read:
                entry = h.cache.get(call.cache_key)
                metrics.CACHE.labels("hit" if entry else "miss").inc()
                if entry is not None:
                    return _from_cache(h, call, route, entry, stream)
                call.headers["x-tollway-cache"] = "miss"
            if not use.write:
                call.cache_key = None
        if stream:
            return await _stream(h, call, route, body, headers)
        t_fwd = time.perf_counter()
        fwd = await forward(h.health, route, route.retry or h.config.retry,
                            _attempt(h, body, raw, "/messages", headers), call.started, call.tried,
                            mix=h.mix(call, route, body))  # fmt: skip
        fwd_s = time.perf_counter() - t_fwd
    except GatewayError as err:
        return h.fail(call, err, route, SHAPE)
    except asyncio.CancelledError:
        _cancelled(h, call, body, route)
        raise
    except ClientDisconnect:
        return _hung_up(h, call, route)
    except Exception:  # a bug: still an Anthropic-shaped answer (naming nothing inside), and still an event
        log.exception("proxy_internal_error", request_id=call.request_id)
        return h.fail(call, GatewayError(f"Internal error (request {call.request_id})."), route, SHAPE)
    reply = fwd.value
    metrics.upstream_latency_by(fwd.route.target.provider).observe(fwd.upstream_s)
    parsed = message_usage(reply.data)
    if parsed is not None:
        usage, tier = parsed
        d.take_usage(usage, "provider")
        d.service_tier = tier
    else:
        usage = estimate_usage(body, output_chars(reply.data))
        d.take_usage(usage, "estimated")
    d.status = "ok"
    call.headers.update(h.quote(d, fwd.route.target.provider, usage, "ok", d.usage_source).headers())
    metrics.tokens_by(route.name, "prompt").inc(usage.prompt_tokens)
    metrics.tokens_by(route.name, "completion").inc(usage.completion_tokens)
    if call.cache_key is not None:
        h._store(call, route, reply.body, usage, fwd.route.target.provider)
    h.finish(call, reply.status, route)
    metrics.ADDED_LATENCY.observe(max(0.0, call.elapsed_ms() / 1000 - fwd_s))
    return JSONBytes(reply.body, reply.status, call.headers)


def _stream_usage(relay: MessagesRelay, body: dict[str, Any]) -> tuple[TokenUsage, str, bool]:
    """(usage, tier, from the provider): the provider's count when message_delta reported it; else what the
    stream said so far (message_start's input counts) with the output estimated from what was relayed."""
    chars = relay.out.content_chars
    if relay.usage.final:
        usage, tier = relay.usage.result()
        return usage, tier, True
    if relay.usage.seen:
        usage, tier = relay.usage.result()
        usage.completion_tokens = max(usage.completion_tokens, (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)
        return usage, tier, False
    return estimate_usage(body, chars), "", False


async def _stream(h: ProxyHandler, call: Call, route: ModelRoute, body: dict[str, Any],
                  headers: dict[str, str] | None) -> Response:  # fmt: skip
    d = call.draft
    assembler = MessageAssembler() if call.cache_key is not None else None

    def on_end(relay: MessagesRelay) -> None:
        out = relay.out
        usage, tier, reported = _stream_usage(relay, body)
        d.take_usage(usage, "provider" if reported else "estimated")
        d.service_tier = tier
        d.ttft_ms = round(out.ttft_ms, 3) if out.ttft_ms is not None else None
        d.client_disconnected = out.client_gone
        broken = out.upstream_broken and not out.client_gone
        d.status = "error" if broken else "ok"
        if broken:
            d.error_code = (
                "upstream_response_too_large"
                if out.too_large
                else "upstream_stream_error"
                if relay.error_type
                else "upstream_stream_broken"
            )
        if out.client_gone:
            metrics.CLIENT_DISCONNECTS.labels(route.name).inc()
        if out.ttft_ms is not None:
            metrics.TTFT.labels(route.name).observe(out.ttft_ms / 1000)
        metrics.tokens_by(route.name, "prompt").inc(d.prompt_tokens)
        metrics.tokens_by(route.name, "completion").inc(d.completion_tokens)
        if assembler is not None and out.completed and not out.upstream_broken:
            message = assembler.message_json()
            if message is not None:
                h._store(call, route, message, d.usage(), call.tried.provider)
        h.finish(call, 200, route)

    async def attempt(target: Target, budget_s: float) -> MessagesRelay:
        payload = orjson.dumps({**body, "model": target.upstream_model})
        resp = await open_stream(h.s.upstream, target, "/messages", payload, budget_s, headers)
        relay = MessagesRelay(resp, call.started, on_end, assembler, h.s.settings.upstream_max_sse_line_bytes,
                              h.s.settings.upstream_max_body_bytes, functools.partial(_quote, h, d, target.provider))  # fmt: skip
        await relay.prime()
        return relay

    return await h.relay_stream(call, route, body, attempt)


def _quote(h: ProxyHandler, d: UsageDraft, provider: str, usage: TokenUsage, tier: str) -> str:
    """A stream's amount for its message_delta usage.cost: the usage and tier on_end bills."""
    d.service_tier = tier  # before the quote: the tier picks the prices
    return h.quote(d, provider, usage, "ok", "provider").usd


def _from_cache(h: ProxyHandler, call: Call, route: ModelRoute, entry: Entry, stream: bool) -> Response:
    """A hit answers at once and costs nothing; the event keeps the tokens so the avoided cost shows in ROI."""
    d = call.draft
    h.answered_from_cache(call, entry.usage, entry.usage_source, entry.provider)
    if not stream:
        h.finish(call, 200, route)
        return Response(entry.body, media_type="application/json", headers=call.headers)

    def on_finish(client_gone: bool) -> None:
        d.client_disconnected = client_gone
        d.ttft_ms = round(call.elapsed_ms(), 3)
        h.finish(call, 200, route)

    return SSEResponse(iterate(replay_events(orjson.loads(entry.body))), on_finish, headers=call.headers)


def _cancelled(h: ProxyHandler, call: Call, body: dict[str, Any], route: ModelRoute | None) -> None:
    # the server is stopping under us: the provider may already have done the work, so the call is recorded
    d = call.draft
    if d.team_id is not None and not call.done:
        if body and call.endpoint == MESSAGES:
            d.take_usage(estimate_usage(body), "estimated")
        d.client_disconnected, d.error_code, d.status = True, "cancelled", "error"
        h.finish(call, 499, route)


def _hung_up(h: ProxyHandler, call: Call, route: ModelRoute | None) -> Response:
    log.info("client_hung_up", request_id=call.request_id, endpoint=call.endpoint)
    d = call.draft
    if d.team_id is not None and not call.done:
        d.client_disconnected, d.error_code = True, "client_disconnected"
        h.finish(call, 499, route)
    return Response(status_code=499)


async def count_tokens(h: ProxyHandler, request: Request) -> Response:
    """POST /v1/messages/count_tokens: the provider's count, passed through; rate-limited, never billed."""
    call = anthropic_call(request, COUNT_TOKENS)
    d = call.draft
    route: ModelRoute | None = None
    body: dict[str, Any] = {}
    try:
        key = authenticate(request, h.s.view)
        d.team_id, d.key_id = key.team_id, key.key_id
        d.metadata = dict(key.metadata)
        body, raw = await read_body(request, h.s.settings.max_body_bytes)
        call.body_bytes = len(raw)
        d.requested_model = str(body.get("model", ""))[:256]
        d.end_user, d.metadata = attribute(body, request.scope["headers"], key.metadata)
        validate_messages(body, count_only=True)
        headers = passed_on(request)
        if not h.s.emitter.spool.accepting:
            raise UsageUnrecordable("Usage could not be recorded (the gateway's usage spool is full), so the call "
                                    "was not made. Retry later.", headers={"retry-after": "5"})  # fmt: skip
        policy = h.policy(key)
        await h.rate_limit(call, _without_tpm(policy), body)  # a request, but no tokens to count against tpm
        call.tpm_cost = 0
        route = h.s.router.resolve(body.get("model"), MESSAGES, policy.models)
        d.served_model = route.name
        fwd = await forward(h.health, route, route.retry or h.config.retry,
                            _attempt(h, body, raw, "/messages/count_tokens", headers), call.started,
                            call.tried)  # fmt: skip
    except GatewayError as err:
        return h.fail(call, err, route, SHAPE)
    except asyncio.CancelledError:
        _cancelled(h, call, body, route)
        raise
    except ClientDisconnect:
        return _hung_up(h, call, route)
    except Exception:
        log.exception("proxy_internal_error", request_id=call.request_id)
        return h.fail(call, GatewayError(f"Internal error (request {call.request_id})."), route, SHAPE)
    reply = fwd.value
    d.status = "ok"  # zero tokens, from the provider: counting is free
    h.finish(call, reply.status, route)
    return JSONBytes(reply.body, reply.status, call.headers)
