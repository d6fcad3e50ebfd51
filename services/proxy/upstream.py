"""The hop to the provider: one pooled HTTP client for the whole process, errors mapped to gateway errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from services.proxy.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.proxy.routing import Target


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    data: Any  # parsed JSON, or None when the body was not JSON


def open_client(max_connections: int) -> httpx.AsyncClient:
    # One client, opened in the lifespan: per-request clients would pay a TCP+TLS handshake every call.
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(60.0, connect=5.0),
        http2=False,
    )


def _timeout(t: Target) -> httpx.Timeout:
    return httpx.Timeout(t.timeout_s, connect=t.connect_timeout_s)


def upstream_failure(status: int, body: bytes, data: Any) -> GatewayError:
    """A provider's non-2xx answer as a gateway error, keeping its message when it has one."""
    message = f"upstream returned HTTP {status}"
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = str(data["error"].get("message") or message)[:1000]
    if status == 429:
        return RateLimited(f"upstream rate limit: {message}", code="upstream_rate_limited")
    if status in (503, 529):
        return UpstreamUnavailable(message)
    if status == 504:
        return UpstreamTimeout(message)
    if 400 <= status < 500:
        err = GatewayError(message)
        err.status, err.type, err.code = status, "invalid_request_error", "upstream_rejected"
        return err
    return UpstreamError(message)


async def post_json(client: httpx.AsyncClient, target: Target, path: str, body: bytes) -> UpstreamReply:
    try:
        resp = await client.post(target.base_url + path, content=body, headers=target.headers,
                                 timeout=_timeout(target))  # fmt: skip
    except httpx.TimeoutException as err:
        raise UpstreamTimeout(f"provider '{target.provider}' timed out") from err
    except httpx.HTTPError as err:
        raise UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}") from err
    raw = resp.content
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    return UpstreamReply(resp.status_code, raw, data)


async def open_stream(client: httpx.AsyncClient, target: Target, path: str, body: bytes) -> httpx.Response:
    """Start a streamed call; on a non-2xx answer read the error body, close, and raise."""
    req = client.build_request("POST", target.base_url + path, content=body, headers=target.headers,
                               timeout=_timeout(target))  # fmt: skip
    try:
        resp = await client.send(req, stream=True)
    except httpx.TimeoutException as err:
        raise UpstreamTimeout(f"provider '{target.provider}' timed out") from err
    except httpx.HTTPError as err:
        raise UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}") from err
    if resp.status_code >= 400:
        raw = await resp.aread()
        await resp.aclose()
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        raise upstream_failure(resp.status_code, raw, data)
    return resp
