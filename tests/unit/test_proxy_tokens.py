"""One token module for the request path: the prompt estimate the bill and the quota share, the output
estimate, tpm's admission count, and provider counts that never crash on garbage."""

from __future__ import annotations

import pytest

from schemas.config import load_config
from services.proxy.quota import QuotaGate
from services.proxy.tokens import (
    TokenUsage,
    admission_tokens,
    count,
    estimate_usage,
    prompt_estimate,
    provider_usage,
    worst_case_tokens,
)

BODY = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}


def test_the_quota_reserves_on_the_same_prompt_estimate_the_bill_uses():
    prompt = prompt_estimate(BODY)
    assert prompt == len('[{"role":"user","content":"' + "x" * 400 + '"}]') // 4
    assert estimate_usage(BODY, completion_chars=9) == TokenUsage(prompt, 3, 0)  # output rounds up
    assert worst_case_tokens(BODY, 1024) == TokenUsage(prompt, 100, 0)  # max_tokens for each of n choices
    gate = QuotaGate(load_config("tollway.yaml"))
    assert gate.worst_case(BODY)[0] == prompt + 100


def test_a_call_without_a_cap_reserves_the_default_and_an_empty_prompt_is_one_token():
    assert worst_case_tokens({"input": ""}, 1024) == TokenUsage(1, 1024, 0)
    assert worst_case_tokens({"messages": [], "max_tokens": True}, 7).completion_tokens == 7  # a bool is no cap


def test_tpm_admission_counts_the_body_and_the_allowed_output():
    assert admission_tokens(BODY, 1000) == 250 + 50
    assert admission_tokens({}, 0) == 1


@pytest.mark.parametrize("garbage", [-1, "12", None, True, 2**62, float("nan"), [3]])
def test_a_providers_garbage_count_is_zero(garbage):
    assert count(garbage) == 0


def test_no_usage_object_means_estimate_and_a_zero_stays_zero():
    assert provider_usage({"choices": []}) is None and provider_usage([1]) is None
    assert provider_usage({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}) == TokenUsage(0, 0, 0)
    assert provider_usage({"usage": {"prompt_tokens": 7.0, "completion_tokens": 2}}) == TokenUsage(7, 2, 0)
