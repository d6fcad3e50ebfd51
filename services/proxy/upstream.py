"""The hop to the provider, errors mapped to gateway errors: plain calls through the process's keep-alive
HTTP/1.1 pool (services/proxy/http1.py), streamed calls through one pooled aiohttp session.

Not httpx on this hop: httpx's pool walks every pooled connection per queued request (encode/httpx#3215)
and was half the proxy's CPU under load (bench/README.md, finding 1); aiohttp's per-request machinery was
the next fifth (finding 13), hence the small client for the plain calls. httpx stays for everything off
the hot path (health probes, CLI, tests).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
import structlog
from yarl import URL

from services.proxy.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.proxy.http1 import Endpoint, Http1Pool, UpstreamTooLarge, endpoint
from services.proxy.retry import parse_retry_after, retryable
from services.proxy.routing import Target

log = structlog.get_logger("tollway.proxy.upstream")
ERROR_BODY_MAX = 64 * 1024  # what is read of a streamed call's error answer


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


def upstream_failure(status: int, body: bytes, data: Any, retry_after: str | None = None,
                     provider: str = "") -> GatewayError:  # fmt: skip
    """A provider's non-2xx answer as a gateway error. The tenant gets a message of ours: a provider's text can
    carry the operator's key (a 401 echoes a masked fragment of it) or its account details. What the provider
    said goes to the log, scrubbed of anything key-like."""
    detail = _provider_message(data)
    log.warning("upstream_error", provider=provider, status=status, detail=scrub(detail) if detail else None)
    err = _failure(status, detail)
    err.upstream_status = status
    err.retryable = retryable(status)
    err.retry_after_s = parse_retry_after(retry_after)
    if err.retry_after_s is not None and err.status in (429, 503):
        err.headers["retry-after"] = str(max(1, math.ceil(err.retry_after_s)))
    return err


def too_large(target: Target, err: BaseException) -> GatewayError:
    """An answer past the size bounds: not retried (the same call would get the same answer)."""
    log.warning("upstream_answer_too_large", provider=target.provider, error=str(err)[:200])
    return UpstreamError(f"provider '{target.provider}' sent an answer larger than the gateway accepts.",
                         code="upstream_response_too_large")  # fmt: skip


# key-like tokens a provider may echo: sk-..., Bearer ..., masked keys (sk-ab****cd), long opaque strings
_SECRETISH = re.compile(r"(?i)\b(?:bearer\s+\S+|sk-\S+|\S*\*{3,}\S*|(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{24,})")


def scrub(text: str) -> str:
    return _SECRETISH.sub("[redacted]", text)[:500]


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


def _provider_message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or "")[:2000]
    return ""


def _failure(status: int, detail: str) -> GatewayError:
    if status == 429:
        return RateLimited("The provider is rate limiting this model; retry shortly.", code="upstream_rate_limited")
    if status in (503, 529):
        return UpstreamUnavailable(f"The provider is unavailable (HTTP {status}).")
    if status in (504, 408):
        return UpstreamTimeout(f"The provider timed out (HTTP {status}).")
    if status in (401, 403, 404):
        # the provider refused the gateway's own credentials or model mapping: the operator's problem, and
        # passing a 401 through would tell the client its (valid) Tollway key is wrong
        return UpstreamError(f"The provider rejected the gateway's request (HTTP {status}); the operator needs to "
                             "check the provider configuration.", code="upstream_rejected")  # fmt: skip
    if 400 <= status < 500:
        # the request itself is what the provider refused (context too long, bad parameter): the caller needs
        # the reason, so it is passed on, scrubbed of key-like tokens
        why = f": {scrub(detail)}" if detail else "."
        err = GatewayError(f"The provider rejected the request (HTTP {status}){why}")
        err.status, err.type, err.code = status, "invalid_request_error", "upstream_rejected"
        return err
    return UpstreamError(f"The provider failed (HTTP {status}).")


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


_endpoints: dict[tuple[int, str], tuple[Target, Endpoint]] = {}
# (target, path, caller headers) -> head, for the few headers a caller may pass on (anthropic-version and
# -beta): bounded, since their values are the caller's; a new value costs one head build (microseconds)
_variants: OrderedDict[tuple[int, str, tuple[tuple[str, str], ...]], tuple[Target, Endpoint]] = OrderedDict()
MAX_VARIANTS = 256


def _endpoint(target: Target, path: str, extra: dict[str, str] | None = None) -> Endpoint:
    # Target holds a dict (unhashable): keyed by identity, checked against the object, built once per route
    if extra:
        vkey = (id(target), path, tuple(extra.items()))
        hit = _variants.get(vkey)
        if hit is None or hit[0] is not target:
            hit = (target, endpoint(target.base_url, path, {**target.headers, **extra}))
            _variants[vkey] = hit
            if len(_variants) > MAX_VARIANTS:
                _variants.popitem(last=False)
        return hit[1]
    hit = _endpoints.get((id(target), path))
    if hit is None or hit[0] is not target:
        hit = (target, endpoint(target.base_url, path, target.headers))
        _endpoints[(id(target), path)] = hit
    return hit[1]


async def post_json(pool: Http1Pool, target: Target, path: str, body: bytes, budget_s: float | None = None,
                    headers: dict[str, str] | None = None) -> UpstreamReply:  # fmt: skip
    """`headers`: the caller's own headers to pass on, over the target's (never its key: the caller picks)."""
    timeout = target.timeout_s if budget_s is None else max(min(target.timeout_s, budget_s), 0.001)
    try:
        status, raw, retry_after = await pool.post(_endpoint(target, path, headers), body, timeout,
                                                   target.connect_timeout_s)  # fmt: skip
    except UpstreamTooLarge as err:
        raise too_large(target, err) from err
    except PLAIN_ERRORS as err:
        raise transport_failure(target, err) from err
    return UpstreamReply(status, raw, _json(raw), retry_after)


async def open_stream(session: aiohttp.ClientSession, target: Target, path: str, body: bytes,
                      budget_s: float | None = None, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:  # fmt: skip
    """Start a streamed call; on a non-2xx answer read the error body, close, and raise."""
    try:
        resp = await session.post(_url(target.base_url, path), data=body,
                                  headers={**target.headers, **headers} if headers else target.headers,
                                  timeout=_stream_timeout(target, budget_s))  # fmt: skip
    except TRANSPORT_ERRORS as err:
        raise transport_failure(target, err) from err
    if resp.status >= 400:
        try:
            raw = await resp.content.read(ERROR_BODY_MAX)
        except TRANSPORT_ERRORS:
            raw = b""
        finally:
            resp.close()  # not release: the rest of an oversized error body is not worth reading
        raise upstream_failure(resp.status, raw, _json(raw), resp.headers.get("retry-after"), target.provider)
    return resp
