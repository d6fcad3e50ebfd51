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

import functools
import os
import secrets
from pathlib import Path
from typing import Any, NamedTuple, cast

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response

from schemas.control import KeyState
from schemas.events import UsageSource
from services.proxy.attribution import attribute
from services.proxy.cache import Entry
from services.proxy.errors import GatewayError, InvalidRequest, UpstreamError
from services.proxy.handler import MAX_TOKENS_CAP, Api, Call, JSONBytes, ProxyHandler, _count
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
    transport_failure,
    upstream_failure,
)

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


def _previous_gone(reply: UpstreamReply) -> GatewayError | None:
    if reply.status == 404 and _error_code(reply.data) == "previous_response_not_found":
        # deleted since (or never stored): the caller's to know, not the operator's configuration
        return ResponseNotFound("Previous response not found.", code="previous_response_not_found")
    return None


def _quoted(text: str) -> bytes:
    return orjson.dumps(text)


class Chain(NamedTuple):
    """A create's ctx on the request skeleton: the calling team, and the stored response it chains on."""

    team: str
    previous: tuple[str, str] | None  # (provider, its id) of previous_response_id


class ResponsesHandler(Api):
    """Serves /v1/responses over the ProxyHandler the lifespan made: a create through its request skeleton
    (this class supplies what differs), the follow-ups through its steps."""

    endpoint = RESPONSES
    path = PATH
    cache_kind = RESPONSES

    def __init__(self, handler: ProxyHandler) -> None:
        super().__init__(handler)
        self.s = handler.s
        self.ids = ResponseIds(id_secret(self.s.settings))
        self.providers: dict[str, Target] = {}  # a target per provider: follow-ups need its URL and headers
        for targets in self.s.router.targets.values():
            for t in targets:
                if t.api == "openai":
                    self.providers.setdefault(t.provider, t)

    # ---- POST /v1/responses ----

    async def create(self, request: Request) -> Response:
        return await self.h.serve(request, self)

    def check(self, request: Request, body: dict[str, Any], key: KeyState) -> Chain:
        validate_responses(body)
        previous = None
        if body.get("previous_response_id") is not None:
            previous = self.ids.unwrap(key.team_id, body["previous_response_id"])
            if previous is None:
                raise ResponseNotFound(f"Previous response with id '{str(body['previous_response_id'])[:200]}' "
                                       "not found.", code="previous_response_not_found")  # fmt: skip
        return Chain(key.team_id, previous)

    def routed(self, body: dict[str, Any], route: ModelRoute, ctx: Chain) -> Health:
        check_output_cap(body, route)
        if ctx.previous is None:
            return self.h.health
        if not any(t.provider == ctx.previous[0] for t in route.targets):
            raise InvalidRequest(f"The previous response was made by a provider that does not serve model "
                                 f"'{route.name}'.", code="invalid_value")  # fmt: skip
        return cast(Health, PinnedHealth(self.h.health, ctx.previous[0]))

    def cacheable(self, body: dict[str, Any], stream: bool, ctx: Chain) -> bool:
        return not stream and ctx.previous is None and body.get("store") is False

    def estimate(self, body: dict[str, Any]) -> TokenUsage | None:
        return responses_usage(None, body)[0]

    @staticmethod
    def upstream_body(body: dict[str, Any], ctx: Chain) -> dict[str, Any]:
        return body if ctx.previous is None else {**body, "previous_response_id": ctx.previous[1]}

    def attempt(self, body: dict[str, Any], raw: bytes, ctx: Chain) -> Any:
        # the bytes read_body re-serialized only when nothing changes on the way
        return self.h.json_attempt(PATH, self.upstream_body(body, ctx), raw if ctx.previous is None else None,
                                   refused=_previous_gone)  # fmt: skip

    def usage(self, reply: UpstreamReply, body: dict[str, Any]) -> tuple[TokenUsage, UsageSource, str | None]:
        return responses_usage(reply.data, body)

    def answer(self, body: dict[str, Any], reply: UpstreamReply, provider: str, ctx: Chain) -> bytes:
        out = reply.body
        upstream_id = reply.data.get("id") if isinstance(reply.data, dict) else None
        if isinstance(upstream_id, str):
            for old, new in self._renames(ctx, provider, body, upstream_id):
                out = out.replace(old, new)
        return out

    def _renames(self, ctx: Chain, provider: str, body: dict[str, Any], upstream_id: str) -> list[tuple[bytes, bytes]]:
        """The provider's ids as the client knows them: this response's, and the previous one it chained on."""
        swaps = [(_quoted(upstream_id), _quoted(self.ids.wrap(ctx.team, provider, upstream_id)))]
        if ctx.previous is not None:
            swaps.append((_quoted(ctx.previous[1]), _quoted(body["previous_response_id"])))
        return swaps

    def from_cache(self, call: Call, route: ModelRoute, entry: Entry, body: dict[str, Any], stream: bool) -> Response:
        usage, source, tier = responses_usage(orjson.loads(entry.body), body)
        call.draft.service_tier = tier  # before the quote: the tier picks the prices
        self.h.answered_from_cache(call, usage, source, entry.provider)
        self.h.finish(call, 200, route)
        return Response(entry.body, media_type="application/json", headers=call.headers)

    async def stream(self, call: Call, route: ModelRoute, body: dict[str, Any], ctx: Chain,
                     health: Health) -> Response:  # fmt: skip
        h, d = self.h, call.draft
        upstream_body = self.upstream_body(body, ctx)

        def on_end(out: ResponsesOutcome) -> None:
            usage, source, tier = responses_usage(out.response, body, out.output_chars)
            d.take_usage(usage, source)
            d.service_tier = tier
            d.status = "ok"
            if out.upstream_broken and not out.client_gone:
                d.status = "error"
                d.error_code = "upstream_response_too_large" if out.too_large else "upstream_stream_broken"
            elif out.terminal == "response.failed" or out.provider_error:
                d.status, d.error_code = "error", "upstream_response_failed"
            h.stream_ended(call, route, out.ttft_ms, out.client_gone)

        async def attempt(target: Target, budget_s: float) -> ResponsesRelay:
            payload = orjson.dumps({**upstream_body, "model": target.upstream_model})
            resp = await open_stream(self.s.upstream, target, PATH, payload, budget_s)
            rename = functools.partial(self._renames, ctx, target.provider, body)
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
        call = Call(request, f"{RESPONSES}.{name}")
        return await self.h.guarded(call, self._follow(call, request, method, suffix, refuse))

    async def _follow(self, call: Call, request: Request, method: str, suffix: str, refuse: str | None) -> Response:
        h, d = self.h, call.draft
        key = h.identify(call, request)
        team = key.team_id
        d.end_user, d.metadata = attribute({}, request.scope["headers"], key.metadata)  # the header's tags
        h.recordable()  # the same rule as a create: no call its event cannot follow
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
        status, raw, data = await self._upstream(target, method, f"{PATH}/{upstream_id}{suffix}", request.url.query)
        if status == 404:
            raise ResponseNotFound(f"Response with id '{str(public)[:200]}' not found.")
        if status >= 300:
            raise upstream_failure(status, raw, data, None, provider)
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
