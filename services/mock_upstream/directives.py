"""Per-request behaviour injection, read from ``X-Mock-*`` headers and the body's ``"mock"`` object."""

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
    cached_tokens: int = 0
    disconnect_after_chunks: int | None = None
    chunk_delay_ms: float | None = None


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
    "cached_tokens": _int,
    "disconnect_after_chunks": _int,
    "chunk_delay_ms": _float,
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
