"""Anthropic Messages usage, normalized into the event's dimensions; one function for a plain answer, a
stream and a cache entry. (A call the provider reported nothing for is estimated by tokens.estimate_usage,
which reads the Messages body's system prompt and tools too.)

Anthropic's `input_tokens` excludes cache reads and writes; the event's prompt_tokens counts all input, so
prompt = input_tokens + cache_read_input_tokens + cache_creation_input_tokens (docs/metering.md,
"Anthropic Messages usage"). Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.proxy.tokens import TokenUsage, count

MAX_TIER = 32  # a service tier is a short name; a longer "tier" is a provider's garbage, cut to size


def _int(obj: Any, field: str) -> int:
    return count(obj.get(field)) if isinstance(obj, dict) else 0


def normalize(usage: dict[str, Any]) -> tuple[TokenUsage, str]:
    """A Messages `usage` object -> (the event's token dimensions, the service tier served or "").

    cache_creation splits the writes by TTL; without it every write is a 5-minute one (the default TTL, and
    what the API reported before the split existed). Where the split and the total disagree, the larger wins
    and the remainder is 5-minute, so the dimensions always add up to the prompt."""
    read = _int(usage, "cache_read_input_tokens")
    split = usage.get("cache_creation")
    total_write = _int(usage, "cache_creation_input_tokens")
    if isinstance(split, dict):
        w1h = _int(split, "ephemeral_1h_input_tokens")
        w5m = max(_int(split, "ephemeral_5m_input_tokens"), total_write - w1h)
    else:
        w5m, w1h = total_write, 0
    tokens = TokenUsage(
        prompt_tokens=_int(usage, "input_tokens") + read + w5m + w1h,
        completion_tokens=_int(usage, "output_tokens"),
        cached_tokens=read,
        reasoning_tokens=_int(usage.get("output_tokens_details"), "thinking_tokens"),
        cache_write_tokens=w5m,
        cache_write_1h_tokens=w1h,
        web_search_requests=_int(usage.get("server_tool_use"), "web_search_requests"),
    )
    tier = usage.get("service_tier")
    return tokens, tier[:MAX_TIER] if isinstance(tier, str) else ""


def message_usage(data: Any) -> tuple[TokenUsage, str] | None:
    """The usage of a parsed Messages answer, or None when it reports none (then the call is estimated)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    return normalize(usage) if isinstance(usage, dict) else None


class StreamUsage:
    """A stream's usage as it arrives: `message_start` carries input and cache counts, `message_delta` the
    cumulative output (and may repeat the input counts). The latest non-null value of each field wins;
    counts are never added across events (message_start's output_tokens is a placeholder, not a share)."""

    __slots__ = ("fields", "final")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.final = False  # message_delta reported usage: the output count is the provider's own

    def add(self, usage: Any, final: bool) -> None:
        if not isinstance(usage, dict):
            return
        for k, v in usage.items():
            if v is not None:
                self.fields[k] = v
        self.final = self.final or final

    @property
    def seen(self) -> bool:
        return bool(self.fields)

    def result(self) -> tuple[TokenUsage, str]:
        return normalize(self.fields)


def output_chars(message: Any) -> int:
    """Characters of generated output in a Messages answer (text, thinking, tool input)."""
    n = 0
    for block in (message.get("content") if isinstance(message, dict) else None) or ():
        if not isinstance(block, dict):
            continue
        for field in ("text", "thinking"):
            if isinstance(block.get(field), str):
                n += len(block[field])
        if block.get("type") == "tool_use" and block.get("input") is not None:
            n += len(orjson.dumps(block["input"]))
    return n
