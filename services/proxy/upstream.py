"""The hop to the provider: one pooled aiohttp session for the whole process, errors mapped to gateway errors.

aiohttp, not httpx, on this hop: httpx's pool walks every pooled connection per queued request
(encode/httpx#3215) and was half the proxy's CPU under load (bench/README.md, finding 1). httpx stays for
everything off the hot path (health probes, CLI, tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
from yarl import URL

from services.proxy.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.proxy.retry import parse_retry_after, retryable
from services.proxy.routing import Target


@dataclass(slots=True)
class UpstreamReply:
    status: int
    body: bytes
    data: Any  # parsed JSON, or None when the body was not JSON
    retry_after: str | None = None


def open_session(max_connections: int) -> aiohttp.ClientSession:
    """One session, opened in the lifespan (inside the running loop): per-request sessions would pay a TCP+TLS
    handshake every call. Keep-alive pool of `max_connections`, DNS answers cached for 5 minutes."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300,
                                     keepalive_timeout=30.0)  # fmt: skip
    return aiohttp.ClientSession(
        connector=connector,
        headers={"content-type": "application/json"},
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),  # one provider's Set-Cookie must never ride along on other tenants' calls
        timeout=aiohttp.ClientTimeout(total=60.0, connect=5.0),
        raise_for_status=False,
    )


@lru_cache(maxsize=1024)
def _url(base_url: str, path: str) -> URL:
    return URL(base_url + path)  # parsed once per (provider, endpoint), not per call


@lru_cache(maxsize=1024)
def _full_timeout(timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout_s, connect=min(connect_timeout_s, timeout_s))


def _timeout(t: Target, budget_s: float | None, stream: bool = False) -> aiohttp.ClientTimeout:
    if not stream and (budget_s is None or budget_s >= t.timeout_s):
        return _full_timeout(t.timeout_s, t.connect_timeout_s)  # the common case: one object per target
    read = t.timeout_s if budget_s is None else max(min(t.timeout_s, budget_s), 0.001)
    connect = min(t.connect_timeout_s, read)
    if stream:
        # a stream may outlive the deadline as long as chunks keep coming: bound each read, not the whole
        return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)
    return aiohttp.ClientTimeout(total=read, connect=connect)


def upstream_failure(status: int, body: bytes, data: Any, retry_after: str | None = None) -> GatewayError:
    """A provider's non-2xx answer as a gateway error, keeping its message when it has one."""
    err = _failure(status, data)
    err.upstream_status = status
    err.retryable = retryable(status)
    err.retry_after_s = parse_retry_after(retry_after)
    if err.retry_after_s is not None and err.status in (429, 503):
        err.headers["retry-after"] = str(max(1, math.ceil(err.retry_after_s)))
    return err


def transport_failure(target: Target, err: BaseException) -> GatewayError:
    """A call that got no HTTP answer (timeout, refused, reset): retryable, another try or route may work."""
    out: GatewayError
    if isinstance(err, TimeoutError):  # aiohttp's ServerTimeoutError is both a ClientError and a TimeoutError
        out = UpstreamTimeout(f"provider '{target.provider}' timed out")
    else:
        out = UpstreamUnavailable(f"provider '{target.provider}' unreachable: {type(err).__name__}")
    out.retryable = True
    return out


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


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


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


async def post_json(session: aiohttp.ClientSession, target: Target, path: str, body: bytes,
                    budget_s: float | None = None) -> UpstreamReply:  # fmt: skip
    try:
        async with session.post(_url(target.base_url, path), data=body, headers=target.headers,
                                timeout=_timeout(target, budget_s)) as resp:  # fmt: skip
            raw = await resp.read()
            status, retry_after = resp.status, resp.headers.get("retry-after")
    except TRANSPORT_ERRORS as err:
        raise transport_failure(target, err) from err
    return UpstreamReply(status, raw, _json(raw), retry_after)


async def open_stream(session: aiohttp.ClientSession, target: Target, path: str, body: bytes,
                      budget_s: float | None = None) -> aiohttp.ClientResponse:  # fmt: skip
    """Start a streamed call; on a non-2xx answer read the error body, close, and raise."""
    try:
        resp = await session.post(_url(target.base_url, path), data=body, headers=target.headers,
                                  timeout=_timeout(target, budget_s, stream=True))  # fmt: skip
    except TRANSPORT_ERRORS as err:
        raise transport_failure(target, err) from err
    if resp.status >= 400:
        try:
            raw = await resp.read()
        except TRANSPORT_ERRORS:
            raw = b""
        finally:
            resp.release()
        raise upstream_failure(resp.status, raw, _json(raw), resp.headers.get("retry-after"))
    return resp
