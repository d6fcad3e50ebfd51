"""SSE pass-through for chat completions: relay chunks as they come, read usage from the final chunk.

The upstream is always asked for usage (`stream_options.include_usage`); its usage-only chunk is
forwarded only when the client asked for it. The usage event is emitted when the stream ends, however
it ends (completed, upstream broke, client went away).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass(slots=True)
class StreamOutcome:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_seen: bool = False
    completed: bool = False
    upstream_broken: bool = False
    ttft_ms: float | None = None
    content_chars: int = 0
    served_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _usage_into(out: StreamOutcome, usage: dict[str, Any]) -> None:
    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    out.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    out.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    out.usage_seen = True


async def relay(
    resp: httpx.Response,
    started: float,
    client_wants_usage: bool,
    out: StreamOutcome,
    on_end: Callable[[StreamOutcome], None],
) -> AsyncIterator[bytes]:
    try:
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                out.completed = True
                yield b"data: [DONE]\n\n"
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue  # a provider keep-alive or garbage line: nothing the client can use
            usage = chunk.get("usage") if isinstance(chunk, dict) else None
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if isinstance(usage, dict):
                _usage_into(out, usage)
                if not choices and not client_wants_usage:
                    continue
            if choices:
                delta = (choices[0] or {}).get("delta") or {}
                content = delta.get("content")
                if content:
                    if out.ttft_ms is None:
                        out.ttft_ms = (time.perf_counter() - started) * 1000
                    out.content_chars += len(content)
            yield b"data: " + payload.encode() + b"\n\n"
    except httpx.HTTPError:
        out.upstream_broken = True
    finally:
        await resp.aclose()
        on_end(out)
