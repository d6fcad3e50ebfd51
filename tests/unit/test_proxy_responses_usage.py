"""Responses API usage, one function for plain, streamed and cached answers: every dimension read from the
final response object, an explicit zero kept, a missing count estimated and marked; and the Responses body's
own fields (`max_output_tokens`, `input`, `instructions`) in tpm admission and the quota's worst case."""

from __future__ import annotations

from schemas.config import load_config
from services.proxy.quota import QuotaGate
from services.proxy.responses_usage import output_chars, responses_usage
from services.proxy.tokens import TokenUsage, admission_tokens, prompt_estimate, usage_of, worst_case_tokens

BODY = {"model": "gpt-4.1", "input": "x" * 400}


def _resp(usage, output=(), tier="default"):
    return {"id": "resp_1", "object": "response", "status": "completed", "service_tier": tier,
            "output": list(output), "usage": usage}  # fmt: skip


FULL = {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 150}  # fmt: skip


def test_every_dimension_is_read_from_the_final_response():
    out = [{"type": "reasoning", "id": "rs_1", "summary": []},
           {"type": "web_search_call", "id": "ws_1"}, {"type": "web_search_call", "id": "ws_2"},
           {"type": "message", "content": [{"type": "output_text", "text": "hello"}]}]  # fmt: skip
    usage, source, tier = responses_usage(_resp(FULL, out, "priority"), BODY)
    # input_tokens already include the cached ones; output_tokens already include reasoning
    assert usage == TokenUsage(120, 30, 100, 12, 0, 0, 2)
    assert source == "provider" and tier == "priority"


def test_an_explicit_zero_stays_zero():
    zero = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
    usage, source, _ = responses_usage(_resp(zero), BODY)
    assert usage == TokenUsage(0, 0, 0, 0) and source == "provider"


def test_missing_details_count_zero_and_missing_usage_is_estimated_from_input_and_output_text():
    usage, source, _ = responses_usage(_resp({"input_tokens": 9, "output_tokens": 4}), BODY)
    assert usage == TokenUsage(9, 4, 0, 0) and source == "provider"
    out = [{"type": "message", "content": [{"type": "output_text", "text": "y" * 40}]},
           {"type": "web_search_call", "id": "ws_1"}]  # fmt: skip
    usage, source, tier = responses_usage(_resp(None, out, tier=None), BODY)
    assert source == "estimated" and tier == ""
    assert usage == TokenUsage(prompt_estimate(BODY), 10, 0, 0, 0, 0, 1)
    assert output_chars(_resp(None, out)) == 40


def test_streamed_output_chars_stand_in_when_the_stream_had_no_final_response():
    usage, source, _ = responses_usage(None, BODY, streamed_chars=8)
    assert source == "estimated" and usage == TokenUsage(prompt_estimate(BODY), 2, 0)


def test_garbage_usage_never_crashes_and_counts_zero():
    usage, source, _ = responses_usage(_resp({"input_tokens": "12", "output_tokens": -3,
                                              "input_tokens_details": [1]}), BODY)  # fmt: skip
    assert usage == TokenUsage(0, 0, 0, 0) and source == "provider"
    assert responses_usage([1], BODY)[1] == "estimated"


def test_instructions_count_in_the_prompt_estimate():
    assert prompt_estimate({**BODY, "instructions": "z" * 400}) == prompt_estimate(BODY) + 100


def test_tpm_admission_and_the_quota_read_max_output_tokens():
    body = {**BODY, "max_output_tokens": 500}
    assert admission_tokens(body, 1000) == 250 + 500
    assert worst_case_tokens(body, 1024) == TokenUsage(prompt_estimate(body), 500, 0)
    gate = QuotaGate(load_config("tollway.yaml"))
    assert gate.worst_case(body)[0] == prompt_estimate(body) + 500


def test_gemini_reasoning_outside_completion_tokens_is_added_in():
    # Google's OpenAI layer: total_tokens says the thinking tokens were not inside completion_tokens
    u = usage_of({"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 86,
                  "completion_tokens_details": {"reasoning_tokens": 60}})  # fmt: skip
    assert u == TokenUsage(21, 65, 0, 60)
    # the same count reported inside completion (OpenAI's convention) is not added twice
    assert usage_of({"prompt_tokens": 21, "completion_tokens": 65, "total_tokens": 86,
                     "completion_tokens_details": {"reasoning_tokens": 60}}) == TokenUsage(21, 65, 0, 60)  # fmt: skip
    # thoughts_token_count (Gemini's native name, passed through by some layers) is read as reasoning
    assert usage_of({"prompt_tokens": 3, "completion_tokens": 10, "thoughts_token_count": 4}) == TokenUsage(3, 10, 0, 4)
    assert usage_of({"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                     "completion_tokens_details": {"reasoning_tokens": 0}}) == TokenUsage(3, 0, 0, 0)  # fmt: skip


def test_deepseek_cache_hits_are_cached_tokens():
    assert usage_of({"prompt_tokens": 50, "completion_tokens": 1, "prompt_cache_hit_tokens": 40}).cached_tokens == 40
