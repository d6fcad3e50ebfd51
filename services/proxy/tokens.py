"""Token counts: what a provider reported (in a response or a stream's usage chunk) and what the proxy
estimates when it reported nothing, before a call (tpm admission, the quota's worst case) or after it.

One place for the shapes providers use and for the ~4-characters-a-token rule, so the bill, the rate limit
and the quota reservation read the same numbers. Pure: no I/O, nothing per request beyond the parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and JSON, for all three estimates
_MAX_COUNT = 2**62  # beyond any real call; a larger "count" is a provider's garbage


@dataclass(slots=True)
class TokenUsage:
    """A call's usage in every dimension the event carries. prompt_tokens counts all input: cached_tokens (cache
    reads) and cache_write_tokens / cache_write_1h_tokens (cache writes) are inside it, whatever the provider's
    own shape (Anthropic reports input_tokens without them: the parser adds them in)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # inside completion_tokens; kept for reporting
    cache_write_tokens: int = 0  # 5-minute TTL writes
    cache_write_1h_tokens: int = 0
    web_search_requests: int = 0  # server-side tool calls billed per request


def count(v: Any) -> int:
    """A token count from a provider: anything but a non-negative number counts as zero, never crashes."""
    if type(v) is int:  # what JSON gives for nearly every count: one exact type test (a bool is not one)
        return v if 0 <= v < _MAX_COUNT else 0
    if type(v) is not float or not 0 <= v < _MAX_COUNT:  # NaN fails the range test too
        return 0
    return int(v)


def reported_cached_tokens(usage: dict[str, Any]) -> Any:
    """Prompt tokens served from the provider's cache, counted inside prompt_tokens (raw, not yet checked):
    OpenAI reports them as prompt_tokens_details.cached_tokens, DeepSeek as prompt_cache_hit_tokens."""
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        return details["cached_tokens"]
    return usage.get("prompt_cache_hit_tokens", 0)


def reported_reasoning_tokens(usage: dict[str, Any]) -> Any:
    """Completion tokens spent reasoning (raw, not yet checked): OpenAI (and Gemini's OpenAI layer) report
    them as completion_tokens_details.reasoning_tokens; layers that pass Gemini's own name through, as
    thoughts_token_count."""
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict) and details.get("reasoning_tokens") is not None:
        return details["reasoning_tokens"]
    return usage.get("thoughts_token_count", 0)


def usage_of(usage: dict[str, Any]) -> TokenUsage:
    """A provider's `usage` object (a chat.completion's, an embedding's, or a stream's final chunk)."""
    prompt, completion = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    reasoning = count(reported_reasoning_tokens(usage))
    if reasoning and count(usage.get("total_tokens")) == prompt + completion + reasoning:
        # Gemini's OpenAI layer has reported thinking tokens beside completion_tokens, not inside them (total
        # says so); they are billed as output, and the event counts reasoning inside completion_tokens
        completion += reasoning
    return TokenUsage(prompt, completion, count(reported_cached_tokens(usage)), reasoning)


def provider_usage(data: Any) -> TokenUsage | None:
    """The usage a parsed response body reports, or None when it reports none (then the call is estimated)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage_of(usage) if isinstance(usage, dict) else None


PROMPT_EXTRAS = ("system", "tools")  # read by the model besides the messages: a Messages system prompt, tool specs


def prompt_estimate(body: dict[str, Any]) -> int:
    """The prompt's tokens from the request alone: the billed estimate and the quota's worst case both use it.
    `input` is an embeddings or Responses input (a string or items); a Responses `instructions` is prompt too."""
    chars = len(orjson.dumps(body.get("messages") or body.get("input") or ""))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        chars += len(instructions)
    for field in PROMPT_EXTRAS:
        if body.get(field):
            chars += len(orjson.dumps(body[field]))
    return max(1, chars // CHARS_PER_TOKEN)


def estimate_usage(body: dict[str, Any], completion_chars: int = 0) -> TokenUsage:
    """A provider that reports no usage is still billed: the prompt and output estimated (marked estimated)."""
    return TokenUsage(prompt_estimate(body), (completion_chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN, 0)


def completion_chars(data: Any) -> int:
    """Characters of generated output in a chat.completion, for estimating tokens the provider did not report."""
    n = 0
    for c in (data.get("choices") if isinstance(data, dict) else None) or ():
        msg = c.get("message") if isinstance(c, dict) else None
        if isinstance(msg, dict):
            if isinstance(msg.get("content"), str):
                n += len(msg["content"])
            if msg.get("tool_calls"):
                n += len(orjson.dumps(msg["tool_calls"]))
    return n


def output_cap(body: dict[str, Any]) -> Any:
    """The output the caller allows: chat's max_completion_tokens / max_tokens, Responses' max_output_tokens."""
    return body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")


def admission_tokens(body: dict[str, Any], body_bytes: int) -> int:
    """What tpm counts before the answer: the prompt plus the completion the caller allows. The prompt is the
    body's size (already known, so no serialization for every rate-limited call), settled later to the actual."""
    cap = output_cap(body)
    return max(1, body_bytes // CHARS_PER_TOKEN) + (cap if isinstance(cap, int) and not isinstance(cap, bool) else 0)


def worst_case_tokens(body: dict[str, Any], default_max_tokens: int) -> TokenUsage:
    """The most a call may use, for the quota's reservation: the prompt estimate plus max_tokens for each of
    its `n` choices (`default_max_tokens` when the caller sets no cap)."""
    cap = output_cap(body)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else default_max_tokens
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
    return TokenUsage(prompt_estimate(body), cap * n, 0)
