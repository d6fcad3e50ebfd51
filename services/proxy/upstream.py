"""The hop to the provider: one pooled HTTP client for the whole process, errors mapped to gateway errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from services.proxy.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.proxy.retry import parse_retry_after, retryable
from services.proxy.routing import Target


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    data: Any  # parsed JSON, or None when the body was not JSON
    retry_after: str | None = None


def open_client(max_connections: int) -> httpx.AsyncClient:
    # One client, opened in the lifespan: per-request clients would pay a TCP+TLS handshake every call.
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(60.0, connect=5.0),
        http2=False,
    )


def _timeout(t: Target, budget_s: float | None = None) -> httpx.Timeout:
    if budget_s is None:
        return httpx.Timeout(t.timeout_s, connect=t.connect_timeout_s)
    budget_s = max(budget_s, 0.001)
    return httpx.Timeout(min(t.timeout_s, budget_s), connect=min(t.connect_timeout_s, budget_s))


def upstream_failure(status: int, body: bytes, data: Any, retry_after: str | None = None) -> GatewayError:
    """A provider's non-2xx answer as a gateway error, keeping its message when it has one."""
    err = _failure(status, data)
    err.upstream_status = status
    err.retryable = retryable(status)
    err.retry_after_s = parse_retry_after(retry_after)
    if err.retry_after_s is not None and err.status in (429, 503):
        err.headers["retry-after"] = str(max(1, math.ceil(err.retry_after_s)))
    return err


def _transport(err: GatewayError) -> GatewayError:
    err.retryable = True  # connect errors and timeouts: another try, or another route, may well work
    return err


def _failure(status: int, data: Any) -> GatewayError:
    message = f"upstream returned HTTP {status}"
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = str(data["error"].get("message") or message)[:1000]
    if status == 429:
        return RateLimited(f"upstream rate limit: {message}", code="upstream_rate_limited")
    if status in (503, 529):
        return UpstreamUnavailable(message)
    if status in (504, 408):
        return UpstreamTimeout(message)
    if status in (401, 403, 404):
        # the provider refused the gateway's own credentials or model mapping: the operator's problem, and
        # passing a 401 through would tell the client its (valid) Tollway key is wrong
        return UpstreamError(f"provider rejected the request (HTTP {status}): {message}", code="upstream_rejected")
    if 400 <= status < 500:
        err = GatewayError(message)
        err.status, err.type, err.code = status, "invalid_request_error", "upstream_rejected"
        return err
    return UpstreamError(message)


async def post_json(client: httpx.AsyncClient, target: Target, path: str, body: bytes,
                    budget_s: float | None = None) -> UpstreamReply:  # fmt: skip
    try:
        resp = await client.post(target.base_url + path, content=body, headers=target.headers,
                                 timeout=_timeout(target, budget_s))  # fmt: skip
    except httpx.TimeoutException as err:
        raise _transport(UpstreamTimeout(f"provider '{target.provider}' timed out")) from err
    except httpx.HTTPError as err:
        raise _transport(
            UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}")
        ) from err
    raw = resp.content
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    return UpstreamReply(resp.status_code, raw, data, resp.headers.get("retry-after"))


async def open_stream(client: httpx.AsyncClient, target: Target, path: str, body: bytes,
                      budget_s: float | None = None) -> httpx.Response:  # fmt: skip
    """Start a streamed call; on a non-2xx answer read the error body, close, and raise."""
    req = client.build_request("POST", target.base_url + path, content=body, headers=target.headers,
                               timeout=_timeout(target, budget_s))  # fmt: skip
    try:
        resp = await client.send(req, stream=True)
    except httpx.TimeoutException as err:
        raise _transport(UpstreamTimeout(f"provider '{target.provider}' timed out")) from err
    except httpx.HTTPError as err:
        raise _transport(
            UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}")
        ) from err
    if resp.status_code >= 400:
        try:
            raw = await resp.aread()
        except httpx.HTTPError:
            raw = b""
        finally:
            await resp.aclose()
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        raise upstream_failure(resp.status_code, raw, data, resp.headers.get("retry-after"))
    return resp
