"""Anthropic's Messages API on the gateway: `POST /v1/messages` (plain and streamed) and
`POST /v1/messages/count_tokens`, routed only to providers that speak it natively (api: anthropic).

The same life as a chat call, through the one request skeleton (ProxyHandler.serve in
services/proxy/handler.py): authenticate -> parse -> admit (limits, quota) -> route -> cache -> forward
(retry/fallback) -> respond -> emit event; MessagesApi supplies what differs: errors in Anthropic's shape, its
body rules, the headers passed on. Usage is normalized by anthropic_usage.py, streams relayed by
anthropic_stream.py. count_tokens is limited by rpm/rpd but neither reserved nor billed: its event carries
zero tokens (endpoint messages.count_tokens), so the call is still seen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import orjson
from starlette.requests import Request
from starlette.responses import Response

from schemas.control import KeyState
from schemas.events import UsageSource
from services.proxy.anthropic_stream import MessageAssembler, MessagesRelay, replay_events
from services.proxy.anthropic_usage import message_usage, output_chars
from services.proxy.cache import Entry
from services.proxy.draft import UsageDraft
from services.proxy.errors import InvalidRequest, Shape
from services.proxy.forward import forward
from services.proxy.handler import (
    MAX_TOKENS_CAP,
    Api,
    Call,
    JSONBytes,
    ProxyHandler,
    _count,
)
from services.proxy.health import Health
from services.proxy.limits import Policy
from services.proxy.routing import ModelRoute, Target
from services.proxy.streaming import SSEResponse, iterate
from services.proxy.tokens import CHARS_PER_TOKEN, TokenUsage, estimate_usage
from services.proxy.upstream import UpstreamReply, open_stream

MESSAGES = "messages"
COUNT_TOKENS = "messages.count_tokens"
SHAPE: Shape = "anthropic"
# the caller's headers passed on to the provider (Claude Code needs both); the Target's default
# anthropic-version applies when the caller sends none. Nothing else of the caller's, never its key.
PASSED_ON = {"anthropic-version": 64, "anthropic-beta": 2048}  # header -> longest value accepted
BETA_QUERY = "?beta=true"
MAX_MESSAGES = 100_000  # Anthropic's own bound on messages per request


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


_PASSED_ON_RAW = {name.encode(): (name, longest) for name, longest in PASSED_ON.items()}


def passed_on(request: Request) -> dict[str, str] | None:
    """The caller's headers for the provider: one scan of the raw headers (the first of a repeated one, as
    Headers.get takes), not a Headers lookup per name."""
    out: dict[str, str] | None = None
    for raw_name, raw_value in request.scope["headers"]:
        found = _PASSED_ON_RAW.get(raw_name)
        if found is None or (out is not None and found[0] in out):
            continue
        name, longest = found
        v = raw_value.decode("latin-1")
        if len(v) > longest or not v.isascii() or not v.isprintable():
            raise InvalidRequest(f"The '{name}' header must be printable ASCII of at most {longest} characters.")
        if out is None:
            out = {}
        out[name] = v
    return out


class Passed(NamedTuple):
    """A Messages call's ctx on the request skeleton: what of the caller's request reaches the provider."""

    headers: dict[str, str] | None
    path: str  # with `?beta=true` when the caller sent it (Claude Code does; the Python SDK 2.x does not)


def upstream_path(request: Request, path: str) -> str:
    # only this flag of the caller's query string: nothing else of the caller's goes to the provider
    query = request.scope["query_string"]
    return path + BETA_QUERY if query and b"beta=true" in query.split(b"&") else path


def _without_tpm(policy: Policy) -> Policy:
    return dataclasses.replace(policy, rules=tuple(r for r in policy.rules if r.metric != "tpm"))


class MessagesApi(Api):
    """/v1/messages over the request skeleton: Anthropic's shape, body rules and usage; the caller's
    anthropic-version and anthropic-beta headers (the call's ctx) passed on."""

    endpoint = MESSAGES
    path = "/messages"
    shape = SHAPE
    cache_kind = None  # the route's

    def open(self, request: Request) -> Call:
        call = Call(request, self.endpoint)
        call.headers["request-id"] = call.request_id  # where Anthropic's SDKs read it (`_request_id`, error logs)
        return call

    def check(self, request: Request, body: dict[str, Any], key: KeyState) -> Passed:
        validate_messages(body, count_only=self.endpoint == COUNT_TOKENS)
        return Passed(passed_on(request), upstream_path(request, self.path))

    def attempt(self, body: dict[str, Any], raw: bytes, ctx: Passed) -> Any:
        return self.h.json_attempt(ctx.path, body, raw, ctx.headers)

    def usage(self, reply: UpstreamReply, body: dict[str, Any]) -> tuple[TokenUsage, UsageSource, str | None]:
        parsed = message_usage(reply.data)
        if parsed is None:
            return estimate_usage(body, output_chars(reply.data)), "estimated", None
        return parsed[0], "provider", parsed[1]

    async def stream(self, call: Call, route: ModelRoute, body: dict[str, Any], ctx: Passed,
                     health: Health) -> Response:  # fmt: skip
        return await _stream(self.h, call, route, body, ctx)

    def from_cache(self, call: Call, route: ModelRoute, entry: Entry, body: dict[str, Any], stream: bool) -> Response:
        return _from_cache(self.h, call, route, entry, stream)


class CountTokensApi(MessagesApi):
    """count_tokens opens, identifies, reads and exits as a Messages call (its own steps between)."""

    endpoint = COUNT_TOKENS
    path = "/messages/count_tokens"

    def estimate(self, body: dict[str, Any]) -> TokenUsage | None:
        return None  # counting is free


async def create(h: ProxyHandler, request: Request) -> Response:
    """POST /v1/messages."""
    return await h.serve(request, h.api(MessagesApi))


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


async def _stream(h: ProxyHandler, call: Call, route: ModelRoute, body: dict[str, Any], ctx: Passed) -> Response:
    d = call.draft
    assembler = MessageAssembler() if call.cache_key is not None else None

    def on_end(relay: MessagesRelay) -> None:
        out = relay.out
        usage, tier, reported = _stream_usage(relay, body)
        d.take_usage(usage, "provider" if reported else "estimated")
        d.service_tier = tier
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
        if assembler is not None and out.completed and not out.upstream_broken:
            message = assembler.message_json()
            if message is not None:
                h._store(call, route, message, d.usage(), call.tried.provider)
        h.stream_ended(call, route, out.ttft_ms, out.client_gone)

    async def attempt(target: Target, budget_s: float) -> MessagesRelay:
        payload = orjson.dumps({**body, "model": target.upstream_model})
        resp = await open_stream(h.s.upstream, target, ctx.path, payload, budget_s, ctx.headers)
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


async def count_tokens(h: ProxyHandler, request: Request) -> Response:
    """POST /v1/messages/count_tokens: the provider's count, passed through; rate-limited, never billed."""
    api = h.api(CountTokensApi)
    call = api.open(request)
    return await h.guarded(call, _count_tokens(h, api, call, request), api.shape, api.estimate)


async def _count_tokens(h: ProxyHandler, api: CountTokensApi, call: Call, request: Request) -> Response:
    key = h.identify(call, request)
    body, raw = await h.read(call, request, key)
    passed = api.check(request, body, key)
    h.recordable()
    policy = h.policy(key)
    await h.rate_limit(call, _without_tpm(policy), body)  # a request, but no tokens to count against tpm
    call.tpm_cost = 0
    route = call.route = h.s.router.resolve(body.get("model"), MESSAGES, policy.models)
    call.draft.served_model = route.name
    fwd = await forward(h.health, route, route.retry or h.config.retry, api.attempt(body, raw, passed),
                        call.started, call.tried)  # fmt: skip
    reply = fwd.value
    call.draft.status = "ok"  # zero tokens, from the provider: counting is free
    h.finish(call, reply.status, route)
    return JSONBytes(reply.body, reply.status, call.headers)
