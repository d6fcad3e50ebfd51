"""Per-request behaviour injection, read from ``X-Mock-*`` headers and the body's ``"mock"`` object.

Every directive works on every API the mock speaks (chat, Responses, Messages) unless noted:

- ``latency_ms``: sleep before answering. ``chunk_delay_ms``: sleep before each streamed content delta.
- ``status`` (>= 400): answer with that error, in the endpoint's error shape; ``retry_after`` sets Retry-After.
- ``fail_times`` + ``fail_key``: the first ``fail_times`` requests carrying the key fail (``status`` or 503).
- ``disconnect_after_chunks``: a stream ends after that many content deltas, with no final event or usage.
- ``stream_chunks``: how many words (= output tokens) the answer has; ``usage: false`` drops usage.
- ``input_tokens``: the prompt's total token count, instead of the count derived from the request.
- ``cached_tokens``: prompt tokens read from the cache (chat ``prompt_tokens_details.cached_tokens``,
  Responses ``input_tokens_details.cached_tokens``, Messages ``cache_read_input_tokens``).
- ``cache_write_tokens`` / ``cache_write_1h_tokens``: prompt tokens written to the cache, 5-minute and
  1-hour (Messages ``cache_creation``). Chat and Responses report no writes, as OpenAI's APIs do not:
  written tokens stay inside their prompt as plain input.
  Cache counts are clamped so read + write never exceed the prompt; any of the three replaces the
  Messages API's own cache_control bookkeeping for that request (an explicit 0 forces a miss).
- ``reasoning_tokens``: reasoning tokens on top of the visible words (chat and Responses
  ``reasoning_tokens``, Messages thinking words); output tokens include them.
- ``service_tier``: the tier reported as served, whatever the request asked for (Responses, Messages).
- ``web_search_requests``: server-side web searches reported (Responses ``web_search_call`` items,
  Messages ``usage.server_tool_use.web_search_requests``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# header -> directive; the body field exists because the Tollway proxy forwards the body, not client headers
HEADERS: dict[str, str] = {
    "x-mock-latency-ms": "latency_ms",
    "x-mock-status": "status",
    "x-mock-retry-after": "retry_after",
    "x-mock-fail-times": "fail_times",
    "x-mock-fail-key": "fail_key",
    "x-mock-usage": "usage",
    "x-mock-stream-chunks": "stream_chunks",
    "x-mock-cached-tokens": "cached_tokens",
    "x-mock-disconnect-after-chunks": "disconnect_after_chunks",
    "x-mock-chunk-delay-ms": "chunk_delay_ms",
    "x-mock-input-tokens": "input_tokens",
    "x-mock-cache-write-tokens": "cache_write_tokens",
    "x-mock-cache-write-1h-tokens": "cache_write_1h_tokens",
    "x-mock-reasoning-tokens": "reasoning_tokens",
    "x-mock-service-tier": "service_tier",
    "x-mock-web-search-requests": "web_search_requests",
}


class DirectiveError(ValueError):
    """A directive that cannot be parsed; answered with a 400, never a 500."""


@dataclass(frozen=True, slots=True)
class Directives:
    latency_ms: float | None = None
    status: int | None = None
    retry_after: float | None = None
    fail_times: int = 0
    fail_key: str | None = None
    usage: bool = True
    stream_chunks: int | None = None
    cached_tokens: int | None = None
    disconnect_after_chunks: int | None = None
    chunk_delay_ms: float | None = None
    input_tokens: int | None = None
    cache_write_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    reasoning_tokens: int | None = None
    service_tier: str | None = None
    web_search_requests: int = 0

    @property
    def steers_cache(self) -> bool:
        # an explicit 0 steers too: it is how a test asks the Messages API for a cache miss
        return any(v is not None for v in (self.cached_tokens, self.cache_write_tokens, self.cache_write_1h_tokens))


NONE = Directives()


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise DirectiveError(f"mock.{name} must be an integer")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DirectiveError(f"mock.{name} must be an integer") from None


def _float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise DirectiveError(f"mock.{name} must be a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise DirectiveError(f"mock.{name} must be a number") from None


def _count(name: str, v: Any) -> int:
    n = _int(name, v)
    if n < 0:
        raise DirectiveError(f"mock.{name} must not be negative")
    return n


def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise DirectiveError(f"mock.{name} must be a boolean")


_PARSERS = {
    "latency_ms": _float,
    "status": _int,
    "retry_after": _float,
    "fail_times": _int,
    "fail_key": lambda _n, v: str(v),
    "usage": _bool,
    "stream_chunks": _int,
    "cached_tokens": _count,
    "disconnect_after_chunks": _int,
    "chunk_delay_ms": _float,
    "input_tokens": _count,
    "cache_write_tokens": _count,
    "cache_write_1h_tokens": _count,
    "reasoning_tokens": _count,
    "service_tier": lambda _n, v: str(v),
    "web_search_requests": _count,
}


def parse_directives(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> Directives:
    """Headers first, then the body's ``mock`` object, which wins on conflict."""
    raw: dict[str, Any] = {}
    for header, name in HEADERS.items():
        value = headers.get(header)
        if value is not None:
            raw[name] = value
    mock = body.get("mock") if body is not None else None
    if mock is not None:
        if not isinstance(mock, Mapping):
            raise DirectiveError("mock must be an object")
        raw.update({k: v for k, v in mock.items() if k in _PARSERS and v is not None})
    if not raw:
        return NONE
    return Directives(**{k: _PARSERS[k](k, v) for k, v in raw.items()})
