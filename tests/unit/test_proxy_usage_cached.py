"""Cache hits are read from each provider's usage shape, in responses and in streams."""

from __future__ import annotations

import pytest

from services.proxy.handler import usage_fields
from services.proxy.streaming import StreamOutcome, _usage_into

OPENAI = {"prompt_tokens": 1200, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 1024}}
# DeepSeek: prompt_tokens includes the hits; prompt_cache_hit_tokens + prompt_cache_miss_tokens == prompt_tokens.
DEEPSEEK = {"prompt_tokens": 1200, "completion_tokens": 30, "prompt_cache_hit_tokens": 1024,
            "prompt_cache_miss_tokens": 176, "total_tokens": 1230}  # fmt: skip


def streamed(usage: dict) -> int:
    out = StreamOutcome()
    _usage_into(out, usage)
    return out.cached_tokens


@pytest.mark.parametrize("usage", [OPENAI, DEEPSEEK], ids=["openai", "deepseek"])
def test_cached_prompt_tokens_are_read_in_either_shape(usage):
    assert usage_fields({"usage": usage}) == {"prompt_tokens": 1200, "completion_tokens": 30, "cached_tokens": 1024,
                                              "reasoning_tokens": 0}  # fmt: skip
    assert streamed(usage) == 1024


def test_no_cache_report_is_zero_and_garbage_never_crashes():
    assert usage_fields({"usage": {"prompt_tokens": 5, "completion_tokens": 1}})["cached_tokens"] == 0
    assert usage_fields({"usage": {"prompt_tokens": 5, "prompt_cache_hit_tokens": "lots"}})["cached_tokens"] == 0
    assert streamed({"prompt_tokens": 5, "prompt_cache_hit_tokens": -3}) == 0


# OpenAI: reasoning tokens are counted inside completion_tokens, reported in completion_tokens_details.
REASONING = {"prompt_tokens": 40, "completion_tokens": 300, "completion_tokens_details": {"reasoning_tokens": 256}}


def test_reasoning_tokens_are_read_in_responses_and_streams():
    assert usage_fields({"usage": REASONING}) == {"prompt_tokens": 40, "completion_tokens": 300, "cached_tokens": 0,
                                                  "reasoning_tokens": 256}  # fmt: skip
    out = StreamOutcome()
    _usage_into(out, REASONING)
    assert out.reasoning_tokens == 256


@pytest.mark.parametrize("details", [None, {}, {"reasoning_tokens": None}, {"reasoning_tokens": "many"}, [1],
                                     {"reasoning_tokens": -1}])  # fmt: skip
def test_no_or_garbage_reasoning_report_is_zero(details):
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "completion_tokens_details": details}
    assert usage_fields({"usage": usage})["reasoning_tokens"] == 0
    out = StreamOutcome()
    _usage_into(out, usage)
    assert out.reasoning_tokens == 0
