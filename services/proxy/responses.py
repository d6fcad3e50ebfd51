"""OpenAI's Responses API through the gateway: `POST /v1/responses` (plain and streamed) and the follow-ups on
a stored response (GET, DELETE, cancel, input_items), over ProxyHandler's steps (Call, admit, forward, finish).

Stored responses live at the provider, under an account every team shares. The client gets Tollway's id for
them (services/proxy/response_ids.py: the provider and the provider's id, bound to the team by an HMAC), so
any replica routes a follow-up, or a create chained on `previous_response_id`, to the provider holding it,
and another team's key gets a 404. Every follow-up that reached auth is an event too (zero tokens, endpoint
"responses.get" etc.): one event per call, whatever it cost.

The cache: a stored response must not come from it (the hit would hand out an id someone else's DELETE
removes, and the provider never stored this call), so only plain `store: false` calls that opt in with
`X-Tollway-Cache` are cached; streams, chained calls and stored responses never are.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from services.proxy import metrics
from services.proxy.attribution import attribute
from services.proxy.auth import authenticate
from services.proxy.cache import cache_key
from services.proxy.errors import GatewayError, InvalidRequest, UpstreamError, UsageUnrecordable
from services.proxy.forward import forward
from services.proxy.handler import MAX_TOKENS_CAP, Call, JSONBytes, ProxyHandler, _count, read_body
from services.proxy.health import Health, RouteState
from services.proxy.response_ids import ResponseIds
from services.proxy.responses_stream import ResponsesOutcome, ResponsesRelay
from services.proxy.responses_usage import responses_usage
from services.proxy.routing import ModelRoute, Target
from services.proxy.settings import ProxySettings
from services.proxy.tokens import TokenUsage
from services.proxy.upstream import (
    TRANSPORT_ERRORS,
    UpstreamReply,
    open_stream,
    post_json,
    transport_failure,
    upstream_failure,
)

log = structlog.get_logger("tollway.proxy.responses")

RESPONSES = "responses"
PATH = "/responses"
FOLLOW_UP_MAX_BYTES = 16 * 1024 * 1024  # a stored response or a page of input items


class ResponseNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


def validate_responses(body: dict[str, Any]) -> None:
    """OpenAI's bounds on the fields the gateway reads or reserves for; the provider checks the rest."""
    inp = body.get("input")
    prev = body.get("previous_response_id")
    if inp is None and prev is None:
        raise InvalidRequest("Missing required parameter: 'input'.", code="missing_required_parameter")
    if inp is not None and not (isinstance(inp, str) or (isinstance(inp, list) and all(isinstance(i, dict)
                                                                                           for i in inp))):  # fmt: skip
        raise InvalidRequest("'input' must be a string or an array of input items.", code="invalid_input")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise InvalidRequest("'previous_response_id' must be a string.", code="invalid_value")
    for field in ("stream", "store", "background", "parallel_tool_calls"):
        if field in body and body[field] is not None and not isinstance(body[field], bool):
            raise InvalidRequest(f"'{field}' must be a boolean.", code="invalid_type")
    if body.get("conversation") is not None:
        # conversations are stored upstream under the account every team shares, named by ids Tollway does
        # not issue: one team could name another's
        raise InvalidRequest("'conversation' is not supported by this gateway; chain with 'previous_response_id'.",
                             code="unsupported_parameter")  # fmt: skip
    if isinstance(inp, list) and any(i.get("type") == "item_reference" for i in inp):
        raise InvalidRequest("Input items of type 'item_reference' are not supported by this gateway (stored items "
                             "belong to an account every team shares).", code="unsupported_parameter")  # fmt: skip
    if body.get("background") is True:
        # a background response is billed when it finishes, which no call through the gateway observes
        raise InvalidRequest("'background' responses are not supported by this gateway.", code="unsupported_parameter")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise InvalidRequest("'instructions' must be a string.", code="invalid_type")
    _count(body, "max_output_tokens", 1, MAX_TOKENS_CAP)
    _count(body, "max_tool_calls", 0, MAX_TOKENS_CAP)
    _count(body, "top_logprobs", 0, 20)
    for field in ("temperature", "top_p"):
        v = body.get(field)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise InvalidRequest(f"'{field}' must be a number.", code="invalid_type")
    for field, kind, name in (("metadata", dict, "an object"), ("reasoning", dict, "an object"),
                              ("text", dict, "an object"), ("tools", list, "an array"),
                              ("stream_options", dict, "an object")):  # fmt: skip
        if body.get(field) is not None and not isinstance(body[field], kind):
            raise InvalidRequest(f"'{field}' must be {name}.", code="invalid_type")


def check_output_cap(body: dict[str, Any], route: ModelRoute) -> None:
    cap, v = route.max_output_tokens, body.get("max_output_tokens")
    if cap is not None and isinstance(v, int) and v > cap:
        raise InvalidRequest(f"'max_output_tokens' is {v}, above the maximum of {cap} output tokens for model "
                             f"'{route.name}'.", code="invalid_value")  # fmt: skip


def id_secret(settings: ProxySettings) -> bytes:
    """The secret response ids are signed with: TOLLWAY_RESPONSES_ID_SECRET (the same on every replica), or
    for a single replica one made at first start and kept in the data dir (read once, at start)."""
    if settings.responses_id_secret is not None:
        return settings.responses_id_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / "proxy" / "response_ids.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:  # link, not rename: replicas sharing the data dir starting at once keep the first one's secret
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


class PinnedHealth:
    """Health with the plan narrowed to one provider: a create chained on previous_response_id must reach the
    provider account that holds the previous response. Everything else is the shared Health's."""

    def __init__(self, health: Health, provider: str) -> None:
        self._health = health
        self._provider = provider

    def plan(self, route: ModelRoute, now: float | None = None,
             mix: tuple[int, int] | None = None) -> list[RouteState]:  # fmt: skip
        return [s for s in self._health.plan(route, now, mix) if s.target.provider == self._provider]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._health, name)


def _error_code(data: Any) -> Any:
    err = data.get("error") if isinstance(data, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def _quoted(text: str) -> bytes:
    return orjson.dumps(text)


class ResponsesHandler:
    """Serves /v1/responses over the ProxyHandler the lifespan made (its steps, its state)."""

    def __init__(self, handler: ProxyHandler) -> None:
        self.h = handler
        self.s = handler.s
        self.ids = ResponseIds(id_secret(self.s.settings))
        self.providers: dict[str, Target] = {}  # a target per provider: follow-ups need its URL and headers
        for targets in self.s.router.targets.values():
            for t in targets:
                if t.api == "openai":
                    self.providers.setdefault(t.provider, t)

    # ---- POST /v1/responses ----

    async def create(self, request: Request) -> Response:
        h, call = self.h, Call(request, RESPONSES)
        d = call.draft
        route: ModelRoute | None = None
        body: dict[str, Any] = {}
        try:
            key = authenticate(request, self.s.view)
            team = key.team_id
            d.team_id, d.key_id = team, key.key_id
            d.metadata = dict(key.metadata)
            body, raw = await read_body(request, self.s.settings.max_body_bytes)
            call.body_bytes = len(raw)
            d.requested_model = str(body.get("model", ""))[:256]
            d.end_user, d.metadata = attribute(body, request.scope["headers"], key.metadata)
            validate_responses(body)
            policy = h.policy(key)
            previous = None
            if body.get("previous_response_id") is not None:
                previous = self.ids.unwrap(team, body["previous_response_id"])
                if previous is None:
                    raise ResponseNotFound(f"Previous response with id '{str(body['previous_response_id'])[:200]}' "
                                           "not found.", code="previous_response_not_found")  # fmt: skip
            await h.admit(call, key, policy, body)
            route = self.s.router.resolve(body.get("model"), RESPONSES, policy.models)
            d.served_model = route.name
            check_output_cap(body, route)
            health: Health = h.health
            if previous is not None:
                if not any(t.provider == previous[0] for t in route.targets):
                    raise InvalidRequest(f"The previous response was made by a provider that does not serve model "
                                         f"'{route.name}'.", code="invalid_value")  # fmt: skip
                health = cast(Health, PinnedHealth(h.health, previous[0]))
            stream = body.get("stream") is True
            d.stream = stream
            if not stream and previous is None and body.get("store") is False:
                use = h.cache_use(request, body, RESPONSES, route)
                if use.write or use.read:
                    call.cache_key = cache_key(team, route.name, RESPONSES, body)
                    if use.read:
                        entry = h.cache.get(call.cache_key)
                        metrics.CACHE.labels("hit" if entry else "miss").inc()
                        if entry is not None:
                            return self._from_cache(call, route, entry.body, entry.provider, body)
                        call.headers["x-tollway-cache"] = "miss"
                    if not use.write:
                        call.cache_key = None
            upstream_body = body if previous is None else {**body, "previous_response_id": previous[1]}
            if stream:
                return await self._stream(call, route, body, upstream_body, health, team)
            t_fwd = time.perf_counter()
            attempt = self._json_attempt(body, upstream_body, raw if previous is None else None)
            fwd = await forward(health, route, route.retry or h.config.retry, attempt, call.started, call.tried,
                                mix=h.mix(call, route, body))  # fmt: skip
            fwd_s = time.perf_counter() - t_fwd
        except GatewayError as err:
            return h.fail(call, err, route)
        except asyncio.CancelledError:
            if d.team_id is not None and not call.done:  # the server is stopping: the provider may have worked
                if body:
                    d.take_usage(responses_usage(None, body)[0], "estimated")
                d.client_disconnected, d.error_code, d.status = True, "cancelled", "error"
                h.finish(call, 499, route)
            raise
        except ClientDisconnect:
            log.info("client_hung_up", request_id=call.request_id, endpoint=call.endpoint)
            if d.team_id is not None and not call.done:
                d.client_disconnected, d.error_code = True, "client_disconnected"
                h.finish(call, 499, route)
            return Response(status_code=499)
        except Exception:
            log.exception("proxy_internal_error", request_id=call.request_id)
            return h.fail(call, GatewayError(f"Internal error (request {call.request_id})."), route)
        reply = fwd.value
        provider = fwd.route.target.provider
        metrics.upstream_latency_by(provider).observe(fwd.upstream_s)
        usage, source, tier = responses_usage(reply.data, body)
        d.take_usage(usage, source)
        d.service_tier, d.status = tier, "ok"
        call.headers.update(h.quote(d, provider, usage, "ok", source).headers())  # services/proxy/cost.py
        metrics.tokens_by(route.name, "prompt").inc(usage.prompt_tokens)
        metrics.tokens_by(route.name, "completion").inc(usage.completion_tokens)
        out = reply.body
        upstream_id = reply.data.get("id") if isinstance(reply.data, dict) else None
        if isinstance(upstream_id, str):
            for old, new in self._renames(team, provider, body, upstream_id):
                out = out.replace(old, new)
        if call.cache_key is not None:
            h._store(call, route, out, usage, provider)
        h.finish(call, reply.status, route)
        metrics.ADDED_LATENCY.observe(max(0.0, call.elapsed_ms() / 1000 - fwd_s))
        return JSONBytes(out, reply.status, call.headers)

    def _renames(self, team: str, provider: str, body: dict[str, Any], upstream_id: str) -> list[tuple[bytes, bytes]]:
        """The provider's ids as the client knows them: this response's, and the previous one it chained on."""
        swaps = [(_quoted(upstream_id), _quoted(self.ids.wrap(team, provider, upstream_id)))]
        prev = body.get("previous_response_id")
        found = self.ids.unwrap(team, prev) if prev is not None else None
        if found is not None:
            swaps.append((_quoted(found[1]), _quoted(prev)))
        return swaps

    def _json_attempt(self, body: dict[str, Any], upstream_body: dict[str, Any], raw: bytes | None) -> Any:
        requested = body.get("model")

        async def attempt(target: Target, budget_s: float) -> UpstreamReply:
            # the bytes read_body re-serialized when nothing changes on the way (no second dumps)
            if raw is not None and requested == target.upstream_model:
                payload = raw
            else:
                payload = orjson.dumps({**upstream_body, "model": target.upstream_model})
            reply = await post_json(self.s.plain, target, PATH, payload, budget_s)
            if reply.status == 404 and _error_code(reply.data) == "previous_response_not_found":
                # deleted since (or never stored): the caller's to know, not the operator's configuration
                raise ResponseNotFound("Previous response not found.", code="previous_response_not_found")
            if reply.status >= 300:
                raise upstream_failure(reply.status, reply.body, reply.data, reply.retry_after, target.provider)
            return reply

        return attempt

    def _from_cache(self, call: Call, route: ModelRoute, cached: bytes, provider: str,
                    body: dict[str, Any]) -> Response:  # fmt: skip
        usage, source, tier = responses_usage(orjson.loads(cached), body)
        call.draft.service_tier = tier  # before the quote: the tier picks the prices
        self.h.answered_from_cache(call, usage, source, provider)
        self.h.finish(call, 200, route)
        return Response(cached, media_type="application/json", headers=call.headers)

    async def _stream(self, call: Call, route: ModelRoute, body: dict[str, Any], upstream_body: dict[str, Any],
                      health: Health, team: str) -> Response:  # fmt: skip
        h, d = self.h, call.draft

        def on_end(out: ResponsesOutcome) -> None:
            usage, source, tier = responses_usage(out.response, body, out.output_chars)
            d.take_usage(usage, source)
            d.service_tier = tier
            d.ttft_ms = round(out.ttft_ms, 3) if out.ttft_ms is not None else None
            d.client_disconnected = out.client_gone
            d.status = "ok"
            if out.upstream_broken and not out.client_gone:
                d.status = "error"
                d.error_code = "upstream_response_too_large" if out.too_large else "upstream_stream_broken"
            elif out.terminal == "response.failed" or out.provider_error:
                d.status, d.error_code = "error", "upstream_response_failed"
            if out.client_gone:
                metrics.CLIENT_DISCONNECTS.labels(route.name).inc()
            if out.ttft_ms is not None:
                metrics.TTFT.labels(route.name).observe(out.ttft_ms / 1000)
            metrics.tokens_by(route.name, "prompt").inc(d.prompt_tokens)
            metrics.tokens_by(route.name, "completion").inc(d.completion_tokens)
            h.finish(call, 200, route)

        async def attempt(target: Target, budget_s: float) -> ResponsesRelay:
            payload = orjson.dumps({**upstream_body, "model": target.upstream_model})
            resp = await open_stream(self.s.upstream, target, PATH, payload, budget_s)
            rename = functools.partial(self._renames, team, target.provider, body)
            relay = ResponsesRelay(resp, call.started, rename, on_end, self.s.settings.upstream_max_sse_line_bytes,
                                   self.s.settings.upstream_max_body_bytes,
                                   functools.partial(self._quote, call, target.provider, body))  # fmt: skip
            await relay.prime()
            return relay

        return await h.relay_stream(call, route, body, attempt, health)

    def _quote(self, call: Call, provider: str, body: dict[str, Any], response: dict[str, Any], chars: int) -> str:
        """The streamed call's amount for its final event's usage.cost: the usage and tier on_end bills."""
        usage, source, tier = responses_usage(response, body, chars)
        call.draft.service_tier = tier  # before the quote: the tier picks the prices
        return self.h.quote(call.draft, provider, usage, "ok", source).usd

    # ---- follow-ups on a stored response ----

    async def retrieve(self, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            return await self._follow_up(request, "get", "GET", "", refuse="Streaming a stored response again "
                                         "(GET ?stream=true) is not supported by this gateway.")  # fmt: skip
        return await self._follow_up(request, "get", "GET", "")

    async def delete(self, request: Request) -> Response:
        return await self._follow_up(request, "delete", "DELETE", "")

    async def cancel(self, request: Request) -> Response:
        return await self._follow_up(request, "cancel", "POST", "/cancel")

    async def input_items(self, request: Request) -> Response:
        return await self._follow_up(request, "input_items", "GET", "/input_items")

    async def _follow_up(self, request: Request, name: str, method: str, suffix: str,
                         refuse: str | None = None) -> Response:  # fmt: skip
        h, call = self.h, Call(request, f"{RESPONSES}.{name}")
        d = call.draft
        try:
            key = authenticate(request, self.s.view)
            team = key.team_id
            d.team_id, d.key_id = team, key.key_id
            d.end_user, d.metadata = attribute({}, request.scope["headers"], key.metadata)  # the header's tags
            if not self.s.emitter.spool.accepting:  # the same rule as a create: no call its event cannot follow
                raise UsageUnrecordable("Usage could not be recorded (the gateway's usage spool is full), so the "
                                        "call was not made. Retry later.", headers={"retry-after": "5"})  # fmt: skip
            if refuse is not None:
                raise InvalidRequest(refuse, code="unsupported_parameter")
            public = request.path_params.get("response_id", "")
            found = self.ids.unwrap(team, public)
            target = self.providers.get(found[0]) if found is not None else None
            if found is None or target is None:
                raise ResponseNotFound(f"Response with id '{str(public)[:200]}' not found.")
            provider, upstream_id = found
            d.provider = provider
            await h.rate_limit(call, h.policy(key), {})
            status, raw, data = await self._upstream(target, method, f"{PATH}/{upstream_id}{suffix}",
                                                     request.url.query)  # fmt: skip
            if status == 404:
                raise ResponseNotFound(f"Response with id '{str(public)[:200]}' not found.")
            if status >= 300:
                raise upstream_failure(status, raw, data, None, provider)
        except GatewayError as err:
            return h.fail(call, err)
        except asyncio.CancelledError:
            if d.team_id is not None and not call.done:
                d.client_disconnected, d.error_code, d.status = True, "cancelled", "error"
                h.finish(call, 499)
            raise
        except Exception:
            log.exception("proxy_internal_error", request_id=call.request_id)
            return h.fail(call, GatewayError(f"Internal error (request {call.request_id})."))
        if isinstance(data, dict):
            prev = data.get("previous_response_id")
            for up in (upstream_id, prev if isinstance(prev, str) else None):
                if up is not None:
                    raw = raw.replace(_quoted(up), _quoted(self.ids.wrap(team, provider, up)))
        d.take_usage(TokenUsage(), "provider")  # reading a stored response costs nothing upstream
        d.status = "ok"
        h.finish(call, status)
        return JSONBytes(raw, status, call.headers)

    async def _upstream(self, target: Target, method: str, path: str, query: str) -> tuple[int, bytes, Any]:
        """A follow-up is not a hot path: one call through the streaming session, no retries, bounded read."""
        url = target.base_url + path + (f"?{query}" if query else "")
        timeout = aiohttp.ClientTimeout(total=target.timeout_s, connect=target.connect_timeout_s)
        try:
            async with self.s.upstream.request(method, url, headers=target.headers, timeout=timeout) as resp:
                parts, size = [], 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > FOLLOW_UP_MAX_BYTES:
                        raise UpstreamError("The provider's answer is larger than the gateway accepts.",
                                            code="upstream_response_too_large")  # fmt: skip
                    parts.append(chunk)
                raw = b"".join(parts)
                status = resp.status
        except TRANSPORT_ERRORS as err:
            raise transport_failure(target, err) from err
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        return status, raw, data
