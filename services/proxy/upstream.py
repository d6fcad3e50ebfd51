"""The hop to the provider, errors mapped to gateway errors: plain calls through the process's keep-alive
HTTP/1.1 pool (services/proxy/http1.py), streamed calls through one pooled aiohttp session.

Not httpx on this hop: httpx's pool walks every pooled connection per queued request (encode/httpx#3215)
and was half the proxy's CPU under load (bench/README.md, finding 1); aiohttp's per-request machinery was
the next fifth (finding 13), hence the small client for the plain calls. httpx stays for everything off
the hot path (health probes, CLI, tests).
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
from services.proxy.http1 import Endpoint, Http1Pool, endpoint
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


def _stream_timeout(t: Target, budget_s: float | None) -> aiohttp.ClientTimeout:
    # a stream may outlive the deadline as long as chunks keep coming: bound each read, not the whole
    read = t.timeout_s if budget_s is None else max(min(t.timeout_s, budget_s), 0.001)
    return aiohttp.ClientTimeout(total=None, connect=min(t.connect_timeout_s, read), sock_read=read)


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
# what the plain hop raises for a call without a complete answer (refused, reset, TLS, unreadable HTTP)
PLAIN_ERRORS = (OSError, TimeoutError)


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


_endpoints: dict[tuple[int, str], tuple[Target, Endpoint]] = {}


def _endpoint(target: Target, path: str) -> Endpoint:
    # Target holds a dict (unhashable): keyed by identity, checked against the object, built once per route
    hit = _endpoints.get((id(target), path))
    if hit is None or hit[0] is not target:
        hit = (target, endpoint(target.base_url, path, target.headers))
        _endpoints[(id(target), path)] = hit
    return hit[1]


async def post_json(pool: Http1Pool, target: Target, path: str, body: bytes,
                    budget_s: float | None = None) -> UpstreamReply:  # fmt: skip
    timeout = target.timeout_s if budget_s is None else max(min(target.timeout_s, budget_s), 0.001)
    try:
        status, raw, retry_after = await pool.post(_endpoint(target, path), body, timeout, target.connect_timeout_s)
    except PLAIN_ERRORS as err:
        raise transport_failure(target, err) from err
    return UpstreamReply(status, raw, _json(raw), retry_after)


async def open_stream(session: aiohttp.ClientSession, target: Target, path: str, body: bytes,
                      budget_s: float | None = None) -> aiohttp.ClientResponse:  # fmt: skip
    """Start a streamed call; on a non-2xx answer read the error body, close, and raise."""
    try:
        resp = await session.post(_url(target.base_url, path), data=body, headers=target.headers,
                                  timeout=_stream_timeout(target, budget_s))  # fmt: skip
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
