"""`GET /v1/models` and `GET /v1/models/{id}`: the models a key may call, in the caller's API shape.

Both SDKs call these paths: the openai SDK expects `{"object": "list", "data": [{"id", "object": "model",
"created", "owned_by"}]}`; the anthropic SDK (and Claude Code's model picker) sends `anthropic-version` and
expects Anthropic's page (`data` of `{"type": "model", "id", "display_name", "created_at"}`, `has_more`,
`first_id`, `last_id`, paged by `limit` / `after_id` / `before_id`). The header decides the shape, as it decides
nothing else here. An Anthropic caller is shown only the models served on /v1/messages: the others would answer
it 404.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from services.proxy.auth import authenticate
from services.proxy.errors import GatewayError, InvalidRequest, ModelNotFound, Shape, error_response
from services.proxy.handler import Call, ProxyHandler
from services.proxy.routing import Router

_EPOCH_ISO = "1970-01-01T00:00:00Z"  # the config holds no release date; both SDKs only parse the field
_PAGE_MAX = 1000  # Anthropic's own bound on `limit`


def _shape(request: Request) -> Shape:
    return "anthropic" if "anthropic-version" in request.headers else "openai"


def _allowed(h: ProxyHandler, request: Request) -> frozenset[str] | None:
    """The caller's plan allow-list, after authentication (raises GatewayError)."""
    return h.policy(authenticate(request, h.s.view)).models


def _visible(h: ProxyHandler, request: Request, shape: Shape) -> list[str]:
    """The ids the caller's key may call (Router.callable_ids; for an Anthropic caller, of the models served on
    /v1/messages)."""
    router = h.s.router
    return [i for i, name in router.callable_ids(_allowed(h, request)) if shape != "anthropic"
            or _on_messages(router, name)]  # fmt: skip


def _on_messages(router: Router, name: str) -> bool:
    return "messages" in router.endpoints_of(name)


def _entry(name: str, shape: Shape) -> dict[str, Any]:
    if shape == "anthropic":
        return {"type": "model", "id": name, "display_name": name, "created_at": _EPOCH_ISO}
    return {"id": name, "object": "model", "created": 0, "owned_by": "tollway"}


def _page(names: list[str], request: Request) -> dict[str, Any]:
    """Anthropic's cursor page over the (sorted) names: after_id / before_id are names, not positions."""
    q = request.query_params
    raw = q.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= _PAGE_MAX:
        raise InvalidRequest(f"limit: must be an integer from 1 to {_PAGE_MAX}")
    limit = int(raw)
    after, before = q.get("after_id"), q.get("before_id")
    if after is not None and before is not None:
        raise InvalidRequest("give after_id or before_id, not both")
    if after is not None:
        rest = [n for n in names if n > after]
        shown, more = rest[:limit], len(rest) > limit
    elif before is not None:
        rest = [n for n in names if n < before]
        shown, more = rest[-limit:], len(rest) > limit
    else:
        shown, more = names[:limit], len(names) > limit
    return {"data": [_entry(n, "anthropic") for n in shown], "has_more": more,
            "first_id": shown[0] if shown else None, "last_id": shown[-1] if shown else None}  # fmt: skip


async def list_models(h: ProxyHandler, request: Request) -> Response:
    call = Call(request, "models")
    shape = _shape(request)
    try:
        names = _visible(h, request, shape)
        if shape == "anthropic":
            body: dict[str, Any] = _page(names, request)
        else:
            body = {"object": "list", "data": [_entry(n, shape) for n in names]}
    except GatewayError as err:
        return error_response(err, call.request_id, shape)
    return Response(orjson.dumps(body), media_type="application/json", headers=call.headers)


async def retrieve_model(h: ProxyHandler, request: Request) -> Response:
    """One model the key may call, by its public name or one of its aliases (named as asked, as OpenAI does)."""
    call = Call(request, "models")
    shape = _shape(request)
    wanted = request.path_params["model_id"]
    try:
        router = h.s.router
        name = router.model_of(wanted, _allowed(h, request))  # the rule a call by this id is resolved under
        if name is None or (shape == "anthropic" and not _on_messages(router, name)):
            raise ModelNotFound(f"The model '{wanted[:200]}' does not exist or you do not have access to it.")
    except GatewayError as err:
        return error_response(err, call.request_id, shape)
    return Response(orjson.dumps(_entry(wanted, shape)), media_type="application/json", headers=call.headers)
