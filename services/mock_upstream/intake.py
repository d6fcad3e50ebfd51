"""What every mock endpoint does before it answers: read the JSON body, parse the directives, sleep the
injected latency and decide the injected failure. Shared by the chat, Responses and Messages APIs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from services.mock_upstream.directives import DirectiveError, Directives, parse_directives
from services.mock_upstream.errors import BadRequest, Shape, error_response
from services.mock_upstream.settings import MockSettings

DEFAULT_FAIL_KEY = "default"


async def read_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def directives(request: Request, body: dict[str, Any] | None) -> Directives:
    # one pass over the raw headers: most requests carry no x-mock-* header at all
    headers = {k.decode(): v.decode() for k, v in request.headers.raw if k.startswith(b"x-mock-")}
    try:
        return parse_directives(headers, body)
    except DirectiveError as e:
        raise BadRequest(str(e)) from None


async def admit(request: Request, d: Directives, shape: Shape = "openai") -> Response | None:
    """Count the request, sleep the injected latency, and return the injected failure if any."""
    state = request.app.state
    settings: MockSettings = state.settings
    if d.fail_key is not None or d.fail_times:
        key = d.fail_key or DEFAULT_FAIL_KEY
        seen = state.fail_keys[key] = state.fail_keys.get(key, 0) + 1
    else:
        seen = 0
    latency = settings.mock_latency_ms if d.latency_ms is None else d.latency_ms
    if latency > 0:
        await asyncio.sleep(latency / 1000)
    if state.fault_status is not None:
        return error_response(state.fault_status, f"Mock upstream outage (HTTP {state.fault_status}).", shape=shape)
    if d.fail_times > 0:
        if seen <= d.fail_times:
            status = d.status if d.status and d.status >= 400 else 503
            message = f"Mock upstream failure {seen} of {d.fail_times}."
            return error_response(status, message, retry_after=d.retry_after, shape=shape)
    elif d.status is not None and d.status >= 400:
        return error_response(
            d.status, f"Mock upstream injected HTTP {d.status}.", retry_after=d.retry_after, shape=shape
        )
    if settings.mock_error_rate > 0 and state.rng.random() < settings.mock_error_rate:
        return error_response(503, "Mock upstream random failure (mock_error_rate).", shape=shape)
    return None


def optional_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadRequest(f"'{name}' must be an integer.", param=name)
        return v
    return None
