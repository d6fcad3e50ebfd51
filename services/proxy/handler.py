"""The request path, top to bottom: authenticate -> parse -> admit (limits, quota) -> route -> cache ->
forward (retry/fallback) -> respond -> emit event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
import uuid_utils
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from schemas.billed import billed_model
from schemas.control import KeyState, TeamState
from schemas.events import UsageSource, utc_now
from services.proxy import metrics
from services.proxy.attribution import attribute
from services.proxy.auth import authenticate
from services.proxy.cache import HEADER as CACHE_HEADER
from services.proxy.cache import CacheUse, CompletionAssembler, Entry, cache_key, cache_use, replay_chunks
from services.proxy.cost import Quote, quote
from services.proxy.draft import UsageDraft
from services.proxy.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Shape,
    UsageUnrecordable,
    error_response,
)
from services.proxy.forward import Tried, forward
from services.proxy.headers import header
from services.proxy.health import Health
from services.proxy.limiter import Ticket
from services.proxy.limits import Policy, resolve_policy
from services.proxy.route_prices import expected_mix
from services.proxy.routing import ModelRoute, Target
from services.proxy.state import ProxyState
from services.proxy.streaming import SSEResponse, StreamOutcome, StreamRelay, iterate
from services.proxy.tokens import TokenUsage, admission_tokens, completion_chars, estimate_usage, provider_usage
from services.proxy.upstream import UpstreamReply, open_stream, post_json, upstream_failure

log = structlog.get_logger("tollway.proxy.handler")

CHAT = "chat.completions"
EMBEDDINGS = "embeddings"
ApiT = TypeVar("ApiT", bound="Api")
CACHE_HEADER_RAW = CACHE_HEADER.lower().encode()


class JSONBytes(Response):
    """A JSON body already in bytes: the raw header list is built directly (Response.init_headers re-checks
    and re-encodes every header through a MutableHeaders)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        # the same list, in the same order, as Response.init_headers builds for these headers
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if not (status_code < 200 or status_code in (204, 304)):
            raw.append((b"content-length", str(len(body)).encode("latin-1")))
        raw.append((b"content-type", b"application/json"))
        self.raw_headers = raw


class Call:
    """What one request accumulates on its way: its usage event (the draft, emitted at the end), what forward
    tried, and the request-side bookkeeping (headers, rate-limit ticket, cache key)."""

    __slots__ = ("body", "body_bytes", "cache_key", "done", "draft", "endpoint", "headers", "request_id", "route",
                 "started", "ticket", "tpm_cost", "tried")  # fmt: skip

    def __init__(self, request: Request, endpoint: str) -> None:
        self.started = time.perf_counter()
        uid = uuid_utils.uuid7()  # one id for both: the event's id, and the request id when the caller sent none
        rid = header(request, b"x-request-id")
        self.request_id = rid[:200] if rid and rid.isprintable() else f"req_{uid.hex}"
        self.endpoint = endpoint
        self.headers: dict[str, str] = {"x-request-id": self.request_id}  # on every response, with x-ratelimit-*
        self.ticket: Ticket | None = None
        self.tpm_cost = 0
        self.body: dict[str, Any] | None = None  # once read: a call cut off by shutdown is estimated from it
        self.body_bytes = 0
        self.route: ModelRoute | None = None  # once resolved
        self.cache_key: bytes | None = None
        self.done = False
        self.tried = Tried()  # filled by forward(), attempt by attempt; into the draft at the end
        self.draft = UsageDraft(event_id=str(uid), occurred_at=utc_now(), request_id=self.request_id, endpoint=endpoint)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


async def read_body(request: Request, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The body parsed, and re-serialized: the bytes sent upstream are what the proxy read, so an upstream
    that takes the first of duplicate keys serves what the proxy bills (orjson keeps the last)."""
    length = header(request, b"content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
    parts: list[bytes] = []
    size = 0
    receive = request.receive
    while True:  # straight from ASGI receive: Request.stream()'s async generator costs more than the read
        message = await receive()
        if message["type"] != "http.request":
            request._is_disconnected = True
            raise ClientDisconnect()
        part = message.get("body", b"")
        if part:
            size += len(part)
            if size > max_bytes:
                raise PayloadTooLarge(f"Request body exceeds {max_bytes} bytes.")
            parts.append(part)
        if not message.get("more_body", False):
            break
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    request._stream_consumed = True
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"Request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        # ~0.4 us for a 1 KB body; also the depth check: orjson reads 1,024 levels but writes 254, and the
        # cache key, token estimate and quota estimate all serialize parts of the body
        canonical = orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise InvalidRequest(f"Request body nests JSON deeper than {MAX_JSON_DEPTH} levels.",
                             code="json_too_deep") from None  # fmt: skip
    return body, canonical


MAX_JSON_DEPTH = 254  # orjson's serialization limit (a body one level deeper fails to serialize)
MAX_N = 128  # OpenAI's own bound on `n`
MAX_TOKENS_CAP = 1_000_000  # for models whose config states no max_output_tokens
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on an embeddings input array


def _count(body: dict[str, Any], field: str, low: int, high: int) -> None:
    v = body.get(field)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high):
        raise InvalidRequest(f"'{field}' must be an integer from {low} to {high}.", code="invalid_value")


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", code="invalid_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a string 'role'.", code="invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.")
    # bounded: the quota reserves max_tokens x n before the call (n=2^62 used to be answered)
    _count(body, "max_tokens", 0, MAX_TOKENS_CAP)
    _count(body, "max_completion_tokens", 0, MAX_TOKENS_CAP)
    _count(body, "n", 1, MAX_N)
    _count(body, "top_logprobs", 0, 20)
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(field)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise InvalidRequest(f"'{field}' must be a number.")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise InvalidRequest("'stream_options' must be an object.")


def validate_embeddings(body: dict[str, Any]) -> None:
    inp = body.get("input")
    ok = isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(x, (str, int, list)) for x in inp))
    if not ok:
        raise InvalidRequest("'input' must be a string or a non-empty array.", code="invalid_input")
    if isinstance(inp, list) and len(inp) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"'input' holds more than {MAX_EMBEDDING_INPUTS} items.", code="invalid_input")
    _count(body, "dimensions", 1, 65_536)


def check_output_cap(body: dict[str, Any], route: ModelRoute) -> None:
    """The model's own output cap, where the config states it."""
    cap = route.max_output_tokens
    if cap is None:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        v = body.get(field)
        if isinstance(v, int) and v > cap:
            raise InvalidRequest(f"'{field}' is {v}, above the maximum of {cap} output tokens for model "
                                 f"'{route.name}'.", code="invalid_value")  # fmt: skip


class Api:
    """What one API brings to the request skeleton (ProxyHandler.serve): its endpoint and error shape, its body
    rules, its usage normalizer, its stream relay and cache answer. Everything else of a call is the
    skeleton's, the same for every API. Made once per handler (ProxyHandler.api); the defaults are chat's."""

    endpoint = CHAT
    path = "/chat/completions"
    shape: Shape = "openai"
    streams = True  # `stream: true` is served (embeddings: never)
    cache_kind: str | None = "chat"  # what cache_use treats the body as (None: the route's kind)

    def __init__(self, handler: ProxyHandler) -> None:
        self.h = handler

    def open(self, request: Request) -> Call:
        return Call(request, self.endpoint)

    def check(self, request: Request, body: dict[str, Any], key: KeyState) -> Any:
        """The API's body rules (raise InvalidRequest); returns what the call needs later of the request (the
        `ctx` of the other steps), before any admission."""
        validate_chat(body)

    def routed(self, body: dict[str, Any], route: ModelRoute, ctx: Any) -> Health:
        """Checks against the model served; the health whose plan the call is forwarded over."""
        check_output_cap(body, route)
        return self.h.health

    def cacheable(self, body: dict[str, Any], stream: bool, ctx: Any) -> bool:
        return True

    def estimate(self, body: dict[str, Any]) -> TokenUsage | None:
        """A call cut off by shutdown after its body was read: the usage recorded (None: nothing to bill)."""
        return estimate_usage(body)

    def attempt(self, body: dict[str, Any], raw: bytes, ctx: Any) -> Any:
        return self.h.json_attempt(self.path, body, raw)

    def usage(self, reply: UpstreamReply, body: dict[str, Any]) -> tuple[TokenUsage, UsageSource, str | None]:
        """(usage, source, service tier or None to leave it) of a plain answer."""
        usage = provider_usage(reply.data)
        if usage is None:
            return estimate_usage(body, completion_chars(reply.data)), "estimated", None
        return usage, "provider", None

    def answer(self, body: dict[str, Any], reply: UpstreamReply, provider: str, ctx: Any) -> bytes:
        """The plain answer's bytes as the caller gets them (and the cache keeps them)."""
        return reply.body

    async def stream(self, call: Call, route: ModelRoute, body: dict[str, Any], ctx: Any, health: Health) -> Response:
        return await self.h.chat_stream(call, route, body, self.path)

    def from_cache(self, call: Call, route: ModelRoute, entry: Entry, body: dict[str, Any], stream: bool) -> Response:
        return self.h.chat_from_cache(call, route, entry, body, stream)


class EmbeddingsApi(Api):
    endpoint = EMBEDDINGS
    path = "/embeddings"
    streams = False
    cache_kind = "embedding"

    def check(self, request: Request, body: dict[str, Any], key: KeyState) -> Any:
        validate_embeddings(body)

    def usage(self, reply: UpstreamReply, body: dict[str, Any]) -> tuple[TokenUsage, UsageSource, str | None]:
        usage, source, tier = super().usage(reply, body)
        usage.completion_tokens = 0
        return usage, source, tier


class ProxyHandler:
    """Serves the OpenAI endpoints over the ProxyState the lifespan opened; its steps serve every API."""

    def __init__(self, state: ProxyState) -> None:
        self.s = state
        self.config = state.config
        self.limiter = state.limiter
        self.cache = state.cache
        self.health = state.health
        # policy per key, recomputed only when the key's or its team's state object is replaced
        self._policies: dict[str, tuple[KeyState, TeamState | None, Policy]] = {}
        self._apis: dict[type[Api], Api] = {}
        self.chat, self.embed = self.api(Api), self.api(EmbeddingsApi)

    def api(self, kind: type[ApiT]) -> ApiT:
        """The handler's one instance of an API (made on first use)."""
        found = self._apis.get(kind)
        if found is None:
            found = self._apis[kind] = kind(self)
        return found  # type: ignore[return-value]

    # ---- the request skeleton, every API ----

    async def serve(self, request: Request, api: Api) -> Response:
        call = api.open(request)
        return await self.guarded(call, self._serve(call, request, api), api.shape, api.estimate)

    async def _serve(self, call: Call, request: Request, api: Api) -> Response:
        d = call.draft
        key = self.identify(call, request)
        body, raw = await self.read(call, request, key)
        ctx = api.check(request, body, key)
        policy = self.policy(key)
        await self.admit(call, key, policy, body)
        route = call.route = self.s.router.resolve(body.get("model"), api.endpoint, policy.models)
        d.served_model = route.name
        health = api.routed(body, route, ctx)
        stream = api.streams and body.get("stream") is True
        d.stream = stream
        if api.cacheable(body, stream, ctx):
            entry = self.cache_lookup(call, request, body, api, route, key.team_id)
            if entry is not None:
                return api.from_cache(call, route, entry, body, stream)
        if stream:
            return await api.stream(call, route, body, ctx, health)
        t_fwd = time.perf_counter()
        fwd = await forward(health, route, route.retry or self.config.retry, api.attempt(body, raw, ctx),
                            call.started, call.tried, mix=self.mix(call, route, body))  # fmt: skip
        fwd_s = time.perf_counter() - t_fwd
        reply = fwd.value
        provider = fwd.route.target.provider
        metrics.upstream_latency_by(provider).observe(fwd.upstream_s)
        usage, source, tier = api.usage(reply, body)
        d.take_usage(usage, source)
        if tier is not None:
            d.service_tier = tier  # before the quote: the tier picks the prices
        d.status = "ok"
        call.headers.update(self.quote(d, provider, usage, "ok", source).headers())
        metrics.tokens_by(route.name, "prompt").inc(usage.prompt_tokens)
        metrics.tokens_by(route.name, "completion").inc(usage.completion_tokens)
        out = api.answer(body, reply, provider, ctx)
        if call.cache_key is not None:
            self._store(call, route, out, usage, provider)
        self.finish(call, reply.status, route)
        metrics.ADDED_LATENCY.observe(max(0.0, call.elapsed_ms() / 1000 - fwd_s))
        return JSONBytes(out, reply.status, call.headers)

    async def guarded(self, call: Call, work: Awaitable[Response], shape: Shape = "openai",
                      estimate: Callable[[dict[str, Any]], TokenUsage | None] | None = None) -> Response:  # fmt: skip
        """The exits every call shares, errors in the caller's shape; each that got past auth is an event."""
        d = call.draft
        try:
            return await work
        except GatewayError as err:
            return self.fail(call, err, call.route, shape)
        except asyncio.CancelledError:
            # the server is stopping under us (uvicorn does not cancel on a client disconnect): the provider
            # may already have done the work, so the call is still recorded, with what we know of it
            if d.team_id is not None and not call.done:
                usage = estimate(call.body) if call.body and estimate is not None else None
                if usage is not None:
                    d.take_usage(usage, "estimated")
                d.client_disconnected, d.error_code, d.status = True, "cancelled", "error"
                self.finish(call, 499, call.route)
            raise
        except ClientDisconnect:
            # the client hung up before its body was in: not our error, an event (499) and an info line
            log.info("client_hung_up", request_id=call.request_id, endpoint=call.endpoint)
            if d.team_id is not None and not call.done:
                d.client_disconnected, d.error_code = True, "client_disconnected"
                self.finish(call, 499, call.route)
            return Response(status_code=499)  # nobody reads it; uvicorn drops it on a closed connection
        except Exception:  # a bug: still an answer in the caller's shape (naming nothing inside), and still an event
            log.exception("proxy_internal_error", request_id=call.request_id)
            return self.fail(call, GatewayError(f"Internal error (request {call.request_id})."), call.route, shape)

    # ---- the steps of a request, in order ----

    def identify(self, call: Call, request: Request) -> KeyState:
        key = authenticate(request, self.s.view)
        d = call.draft
        d.team_id, d.key_id = key.team_id, key.key_id
        d.metadata = dict(key.metadata)
        return key

    async def read(self, call: Call, request: Request, key: KeyState) -> tuple[dict[str, Any], bytes]:
        """The body, bounded and parsed, and what the event takes of it (model asked for, attribution)."""
        body, raw = await read_body(request, self.s.settings.max_body_bytes)
        call.body, call.body_bytes = body, len(raw)
        d = call.draft
        d.requested_model = str(body.get("model", ""))[:256]
        d.end_user, d.metadata = attribute(body, request.scope["headers"], key.metadata)
        return body, raw

    def policy(self, key: KeyState) -> Policy:
        team = self.s.view.teams.get(key.team_id)
        hit = self._policies.get(key.key_id)
        if hit is not None and hit[0] is key and hit[1] is team:
            return hit[2]
        policy = resolve_policy(self.config, key, team)
        self._policies[key.key_id] = (key, team, policy)
        return policy

    def recordable(self) -> None:
        """No call is made that its usage event could not follow."""
        if not self.s.emitter.spool.accepting:
            raise UsageUnrecordable("Usage could not be recorded (the gateway's usage spool is full), so the call "
                                    "was not made. Retry later.", headers={"retry-after": "5"})  # fmt: skip

    async def admit(self, call: Call, key: KeyState, policy: Policy, body: dict[str, Any]) -> None:
        """Admission, before any upstream work. Each check raises a GatewayError (429, 503) to reject."""
        self.recordable()
        await self.rate_limit(call, policy, body)
        # Monthly quota (QuotaExceeded): reserves the call's worst case, settled in finish().
        self.s.quota.admit(call.draft.event_id, key, body, call.draft.end_user, call.draft.metadata)

    async def rate_limit(self, call: Call, policy: Policy, body: dict[str, Any]) -> None:
        """Per key and per team: rpm, rpd, tpm. Raises RateLimited (429 + Retry-After); otherwise leaves
        x-ratelimit-* headers on the call and a ticket so tpm is settled with the actual usage at the end."""
        if not policy.rules:
            return
        call.tpm_cost = admission_tokens(body, call.body_bytes)
        costs = [call.tpm_cost if r.metric == "tpm" else 1 for r in policy.rules]
        verdict, ticket = await self.limiter.admit(policy.rules, costs)
        call.headers.update(verdict.headers)
        if not verdict.allowed:
            rule = verdict.rejected
            assert rule is not None
            metrics.RATE_LIMITED.labels(rule.scope, rule.metric).inc()
            what = "tokens" if rule.metric == "tpm" else "requests"
            per = {"rpm": "minute", "rpd": "day", "tpm": "minute"}[rule.metric]
            raise RateLimited(f"Rate limit reached for {rule.scope} on {what} per {per}: limit {rule.limit}. "
                              f"Retry after {verdict.headers.get('retry-after', '1')} s.")  # fmt: skip
        call.ticket = ticket

    def settle_limits(self, call: Call, actual_tokens: int) -> None:
        """tpm counted an estimate at admission; now the call is over, count what it really used."""
        if call.ticket is None or not call.tpm_cost:
            return
        delta = actual_tokens - call.tpm_cost
        if delta:
            self.limiter.correct(call.ticket, [delta if r.metric == "tpm" else 0 for r in call.ticket.rules])

    def finish(self, call: Call, status: int, route: ModelRoute | None = None) -> None:
        """The single exit of every call that got past parsing the key: the usage event is emitted here, once."""
        if call.done:
            return
        call.done = True
        d = call.draft
        d.http_status = status
        d.latency_ms = round(call.elapsed_ms(), 3)
        tried = call.tried
        if tried.attempts:  # the call went upstream (a cache hit did not: its draft says so already)
            d.attempts, d.provider, d.fallback_used = tried.attempts, tried.provider, tried.fallback_used
            d.route_reason = tried.reason
        self.s.quota.settle(d)  # the quota reservation becomes the actual usage
        if call.ticket is not None:
            self.settle_limits(call, d.prompt_tokens + d.completion_tokens if d.status != "cached" else 0)
        if d.error_code == "usage_unrecordable":
            # refused because the spool is full: its event would take the room kept for calls in flight
            metrics.EVENTS.labels("not_recorded_spool_full").inc()
        elif d.team_id is not None:  # only calls that got past auth are events
            self.s.emitter.emit(d)  # (the queue-depth gauge is the sender's to update, once per round)
        model = billed_model(d.served_model, d.requested_model) or "unknown"
        metrics.requests_by(call.endpoint, model if route else "unknown", d.provider, d.status).inc()
        metrics.latency_by(call.endpoint).observe(d.latency_ms / 1000)

    def fail(self, call: Call, err: GatewayError, route: ModelRoute | None = None, shape: Shape = "openai") -> Response:
        rejected = err.code in ("rate_limit_exceeded", "insufficient_quota")
        call.draft.status = "rejected" if rejected else "error"
        call.draft.error_code = err.code
        self.finish(call, err.status, route)
        err.headers = {**call.headers, **err.headers}
        return error_response(err, call.request_id, shape)

    async def chat_completions(self, request: Request) -> Response:
        return await self.serve(request, self.chat)

    async def embeddings(self, request: Request) -> Response:
        return await self.serve(request, self.embed)

    def json_attempt(self, path: str, body: dict[str, Any], raw: bytes | None, headers: dict[str, str] | None = None,
                     refused: Callable[[UpstreamReply], GatewayError | None] | None = None) -> Any:  # fmt: skip
        """One try of a plain call: `raw` (the bytes read_body re-serialized) is sent as it is when the route keeps
        the model name (no second dumps; None: always from `body`); `refused` may name an answer's error first."""
        requested = body.get("model")
        plain = self.s.plain

        async def attempt(target: Target, budget_s: float) -> UpstreamReply:
            if raw is not None and requested == target.upstream_model:
                payload = raw
            else:
                payload = orjson.dumps({**body, "model": target.upstream_model})
            reply = await post_json(plain, target, path, payload, budget_s, headers)
            if reply.status >= 300:
                raise (refused and refused(reply)) or upstream_failure(reply.status, reply.body, reply.data,
                                                                       reply.retry_after, target.provider)  # fmt: skip
            return reply

        return attempt

    async def chat_stream(self, call: Call, route: ModelRoute, body: dict[str, Any], path: str) -> Response:
        d = call.draft
        opts = body.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        # always ask for usage: the bill must come from the provider's count, not our estimate
        upstream_body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
        assembler = CompletionAssembler() if call.cache_key is not None else None

        def on_end(out: StreamOutcome) -> None:
            if out.usage is not None:
                d.take_usage(out.usage, "provider")
            else:
                d.take_usage(estimate_usage(body, out.content_chars), "estimated")
            d.status = "error" if out.upstream_broken and not out.client_gone else "ok"
            if out.upstream_broken and not out.client_gone:
                d.error_code = "upstream_response_too_large" if out.too_large else "upstream_stream_broken"
            if assembler is not None and out.completed and not out.upstream_broken:
                completion = assembler.completion()
                if completion is not None:
                    self._store(call, route, orjson.dumps(completion), d.usage(), call.tried.provider)
            self.stream_ended(call, route, out.ttft_ms, out.client_gone)

        async def attempt(target: Target, budget_s: float) -> StreamRelay:
            payload = orjson.dumps({**upstream_body, "model": target.upstream_model})
            resp = await open_stream(self.s.upstream, target, path, payload, budget_s)
            relay = StreamRelay(
                resp,
                call.started,
                wants_usage,
                on_end,
                assembler,
                self.s.settings.upstream_max_sse_line_bytes,
                self.s.settings.upstream_max_body_bytes,
                (lambda u: self.quote(d, target.provider, u, "ok", "provider").usd) if wants_usage else None,
            )
            await relay.prime()
            return relay

        return await self.relay_stream(call, route, body, attempt)

    def stream_ended(self, call: Call, route: ModelRoute, ttft_ms: float | None, client_gone: bool) -> None:
        """The end of every API's stream, its usage and status on the draft: time to first token, a hang-up,
        the metrics, and the event."""
        d = call.draft
        d.ttft_ms = round(ttft_ms, 3) if ttft_ms is not None else None
        d.client_disconnected = client_gone
        if client_gone:
            metrics.CLIENT_DISCONNECTS.labels(route.name).inc()
        if ttft_ms is not None:
            metrics.TTFT.labels(route.name).observe(ttft_ms / 1000)
        metrics.tokens_by(route.name, "prompt").inc(d.prompt_tokens)
        metrics.tokens_by(route.name, "completion").inc(d.completion_tokens)
        self.finish(call, 200, route)

    async def relay_stream(self, call: Call, route: ModelRoute, body: dict[str, Any], attempt: Any,
                           health: Health | None = None) -> SSEResponse:  # fmt: skip
        """Forward a streamed call (retries and fallbacks until a relay has its first event) and answer with
        its relay; the same for every API (`attempt` opens and primes that API's relay; `health` narrows the
        plan, e.g. to the provider a chained Responses call must reach)."""
        t_fwd = time.perf_counter()
        fwd = await forward(health or self.health, route, route.retry or self.config.retry, attempt, call.started,
                            call.tried, mix=self.mix(call, route, body))  # fmt: skip
        fwd_s = time.perf_counter() - t_fwd
        metrics.upstream_latency_by(fwd.route.target.provider).observe(fwd.upstream_s)
        metrics.ADDED_LATENCY.observe(max(0.0, call.elapsed_ms() / 1000 - fwd_s))
        relay = fwd.value
        return SSEResponse(relay.events(), relay.finish, relay.aclose, headers=call.headers)

    # ---- cost and route choice ----

    def quote(self, d: UsageDraft, provider: str, usage: TokenUsage, status: str, source: str) -> Quote:
        """The call's provisional cost (services/proxy/cost.py), kept on its event as what the caller was told
        (a stream's usage chunk is priced as it passes; the draft takes that usage when the stream ends)."""
        q = quote(self.s.book, d.served_model, provider, d.occurred_at, status, usage, source, d.service_tier)
        d.quoted_cost_usd, d.quoted_price_version = q.usd, q.version
        return q

    @staticmethod
    def mix(call: Call, route: ModelRoute, body: dict[str, Any]) -> tuple[int, int] | None:
        return expected_mix(body, call.body_bytes, route) if route.routing == "cheapest" else None

    # ---- response cache ----

    def cache_use(self, request: Request, body: dict[str, Any], kind: str, route: ModelRoute) -> CacheUse:
        if not self.config.cache.enabled or route.cache_ttl_s == 0:
            return CacheUse(False, False)
        return cache_use(header(request, CACHE_HEADER_RAW), body, kind)

    def cache_lookup(self, call: Call, request: Request, body: dict[str, Any], api: Api, route: ModelRoute,
                     team_id: str) -> Entry | None:  # fmt: skip
        """A hit to answer from; else the call keeps its cache key when its answer is to be stored."""
        use = self.cache_use(request, body, api.cache_kind or route.kind, route)
        if not (use.write or use.read):
            return None
        call.cache_key = cache_key(team_id, route.name, api.endpoint, body)
        if use.read:
            entry = self.cache.get(call.cache_key)
            metrics.CACHE.labels("hit" if entry else "miss").inc()
            if entry is not None:
                return entry
            call.headers["x-tollway-cache"] = "miss"
        if not use.write:
            call.cache_key = None
        return None

    def _store(self, call: Call, route: ModelRoute, body: bytes, usage: TokenUsage, provider: str) -> None:
        assert call.cache_key is not None
        ttl = route.cache_ttl_s if route.cache_ttl_s is not None else self.config.cache.ttl_s
        entry = Entry(body, usage, call.draft.usage_source, provider, time.monotonic() + ttl)
        if self.cache.put(call.cache_key, entry):
            metrics.CACHE.labels("store").inc()
            metrics.CACHE_ENTRIES.set(len(self.cache))

    def answered_from_cache(self, call: Call, usage: TokenUsage, source: UsageSource, provider: str) -> Quote:
        """The draft of a cache hit (every API): the tokens kept, so the avoided cost shows in ROI, billed 0;
        the hit and its quote (status cached) in the headers."""
        d = call.draft
        d.take_usage(usage, source)
        d.status, d.cache_hit, d.attempts, d.provider = "cached", True, 0, provider
        d.route_reason = "cache"
        call.headers["x-tollway-cache"] = "hit"
        told = self.quote(d, provider, usage, "cached", source)
        call.headers.update(told.headers())
        return told

    def chat_from_cache(self, call: Call, route: ModelRoute, entry: Entry, body: dict[str, Any],
                        stream: bool) -> Response:  # fmt: skip
        """A hit answers at once and costs nothing; the event keeps the tokens so the avoided cost shows in ROI."""
        d = call.draft
        told = self.answered_from_cache(call, entry.usage, entry.usage_source, entry.provider)
        if not stream:
            self.finish(call, 200, route)
            return Response(entry.body, media_type="application/json", headers=call.headers)
        opts = body.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        completion = orjson.loads(entry.body)
        if wants_usage and told.usd and isinstance(completion.get("usage"), dict):
            completion["usage"]["cost"] = 0  # a hit is billed zero (exactly: no float to round)
        events = replay_chunks(completion, wants_usage)

        def on_finish(client_gone: bool) -> None:
            d.client_disconnected = client_gone
            d.ttft_ms = round(call.elapsed_ms(), 3)
            self.finish(call, 200, route)

        return SSEResponse(iterate(events), on_finish, headers=call.headers)
