"""Usage of an OpenAI Responses API call, read from the response object (a plain answer, the response in a
stream's final event, or a cached answer: one function for all three) into the event's dimensions.

`input_tokens` already include `input_tokens_details.cached_tokens`, and `output_tokens` already include
`output_tokens_details.reasoning_tokens`, which is TokenUsage's convention too: nothing is added. Server-side
web searches are the `web_search_call` items in `output`. A missing usage object is estimated and marked;
an explicit zero stays zero.
"""

from __future__ import annotations

from typing import Any

from schemas.events import UsageSource
from services.proxy.tokens import CHARS_PER_TOKEN, TokenUsage, count, prompt_estimate

_TEXT_PARTS = frozenset({"output_text", "refusal"})


def _detail(usage: dict[str, Any], field: str, name: str) -> int:
    details = usage.get(field)
    return count(details.get(name)) if isinstance(details, dict) else 0


def _output(response: Any) -> list[Any]:
    out = response.get("output") if isinstance(response, dict) else None
    return out if isinstance(out, list) else []


def web_search_calls(response: Any) -> int:
    return sum(1 for item in _output(response) if isinstance(item, dict) and item.get("type") == "web_search_call")


def output_chars(response: Any) -> int:
    """Characters of generated output (text, refusals, function-call arguments), for an estimate."""
    n = 0
    for item in _output(response):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            n += len(item["arguments"])
        for part in item.get("content") or () if isinstance(item.get("content"), list) else ():
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
                text = part.get("text", part.get("refusal"))
                n += len(text) if isinstance(text, str) else 0
    return n


def responses_usage(response: Any, body: dict[str, Any],
                    streamed_chars: int = 0) -> tuple[TokenUsage, UsageSource, str]:  # fmt: skip
    """(usage, source, service tier served). `response` is None when a stream ended without its final event;
    then `streamed_chars` (the output text deltas seen) stands in for the output."""
    searches = web_search_calls(response)
    tier = response.get("service_tier") if isinstance(response, dict) else None
    tier = tier[:32] if isinstance(tier, str) else ""
    usage = response.get("usage") if isinstance(response, dict) else None
    if isinstance(usage, dict):
        return TokenUsage(
            prompt_tokens=count(usage.get("input_tokens")),
            completion_tokens=count(usage.get("output_tokens")),
            cached_tokens=_detail(usage, "input_tokens_details", "cached_tokens"),
            reasoning_tokens=_detail(usage, "output_tokens_details", "reasoning_tokens"),
            web_search_requests=searches,
        ), "provider", tier  # fmt: skip
    chars = max(output_chars(response), streamed_chars)
    estimate = TokenUsage(prompt_estimate(body), (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN,
                          web_search_requests=searches)  # fmt: skip
    return estimate, "estimated", tier
