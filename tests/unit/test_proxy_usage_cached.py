"""Cache hits are read from each provider's usage shape, in responses and in streams."""

from __future__ import annotations

import pytest

from services.proxy.tokens import TokenUsage, provider_usage, usage_of

OPENAI = {"prompt_tokens": 1200, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 1024}}
# DeepSeek: prompt_tokens includes the hits; prompt_cache_hit_tokens + prompt_cache_miss_tokens == prompt_tokens.
DEEPSEEK = {"prompt_tokens": 1200, "completion_tokens": 30, "prompt_cache_hit_tokens": 1024,
            "prompt_cache_miss_tokens": 176, "total_tokens": 1230}  # fmt: skip


def streamed(usage: dict) -> int:
    """A stream's final chunk carries the usage object alone (no response around it)."""
    return usage_of(usage).cached_tokens


@pytest.mark.parametrize("usage", [OPENAI, DEEPSEEK], ids=["openai", "deepseek"])
def test_cached_prompt_tokens_are_read_in_either_shape(usage):
    assert provider_usage({"usage": usage}) == TokenUsage(prompt_tokens=1200, completion_tokens=30, cached_tokens=1024)
    assert streamed(usage) == 1024


def test_no_cache_report_is_zero_and_garbage_never_crashes():
    assert provider_usage({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}).cached_tokens == 0
    assert provider_usage({"usage": {"prompt_tokens": 5, "prompt_cache_hit_tokens": "lots"}}).cached_tokens == 0
    assert streamed({"prompt_tokens": 5, "prompt_cache_hit_tokens": -3}) == 0


# OpenAI: reasoning tokens are counted inside completion_tokens, reported in completion_tokens_details.
REASONING = {"prompt_tokens": 40, "completion_tokens": 300, "completion_tokens_details": {"reasoning_tokens": 256}}


def test_reasoning_tokens_are_read_in_responses_and_streams():
    assert provider_usage({"usage": REASONING}) == TokenUsage(40, 300, 0, reasoning_tokens=256)
    assert usage_of(REASONING).reasoning_tokens == 256  # a stream's final usage chunk


@pytest.mark.parametrize("details", [None, {}, {"reasoning_tokens": None}, {"reasoning_tokens": "many"}, [1],
                                     {"reasoning_tokens": -1}])  # fmt: skip
def test_no_or_garbage_reasoning_report_is_zero(details):
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "completion_tokens_details": details}
    assert usage_of(usage).reasoning_tokens == 0
