"""Anthropic Messages usage -> the event's dimensions: every dimension, explicit zeros, missing counts, the
stream's two usage events, and the cache conversions that must keep them."""

from __future__ import annotations

import orjson

from services.proxy.anthropic_stream import MessageAssembler, _event, delta_chars, replay_events
from services.proxy.anthropic_usage import StreamUsage, message_usage, normalize, output_chars
from services.proxy.errors import ANTHROPIC_TYPES, GatewayError, anthropic_type, error_response
from services.proxy.tokens import TokenUsage, estimate_usage, prompt_estimate, worst_case_tokens

FULL = {
    "input_tokens": 11,
    "cache_read_input_tokens": 200,
    "cache_creation_input_tokens": 50,
    "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20},
    "output_tokens": 40,
    "output_tokens_details": {"thinking_tokens": 9},
    "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 1},
    "service_tier": "priority",
}


def test_every_dimension_is_mapped_and_the_prompt_counts_cache_reads_and_writes():
    usage, tier = normalize(FULL)
    assert usage == TokenUsage(
        prompt_tokens=11 + 200 + 50,  # Anthropic's input_tokens excludes the cache: added back in
        completion_tokens=40,
        cached_tokens=200,
        reasoning_tokens=9,
        cache_write_tokens=30,
        cache_write_1h_tokens=20,
        web_search_requests=3,
    )
    assert tier == "priority"


def test_without_the_ttl_split_every_cache_write_is_five_minute():
    usage, _ = normalize({"input_tokens": 5, "cache_creation_input_tokens": 70, "output_tokens": 1})
    assert (usage.prompt_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (75, 70, 0)


def test_a_split_that_disagrees_with_the_total_still_adds_up_to_the_prompt():
    short = normalize({"input_tokens": 1, "cache_creation_input_tokens": 50,
                       "cache_creation": {"ephemeral_1h_input_tokens": 20}})[0]  # fmt: skip
    assert (short.cache_write_tokens, short.cache_write_1h_tokens, short.prompt_tokens) == (30, 20, 51)
    split_only = normalize({"input_tokens": 1, "cache_creation": {"ephemeral_5m_input_tokens": 4,
                                                                  "ephemeral_1h_input_tokens": 6}})[0]  # fmt: skip
    assert (split_only.cache_write_tokens, split_only.cache_write_1h_tokens, split_only.prompt_tokens) == (4, 6, 11)


def test_explicit_zeros_stay_zero_and_garbage_counts_as_zero():
    zero = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 0}
    assert normalize(zero) == (TokenUsage(), "")
    assert message_usage({"usage": zero}) == (TokenUsage(), "")  # reported (zero), not missing
    bad = {"input_tokens": -3, "output_tokens": "12", "cache_read_input_tokens": True, "service_tier": 7,
           "cache_creation": "x", "server_tool_use": [1]}  # fmt: skip
    assert normalize(bad) == (TokenUsage(), "")


def test_missing_usage_is_none_so_the_call_is_estimated():
    assert message_usage({"id": "msg_1", "content": []}) is None
    assert message_usage({"usage": None}) is None
    assert message_usage(None) is None


def test_stream_usage_takes_the_latest_non_null_of_each_field_never_the_sum():
    s = StreamUsage()
    start = {"input_tokens": 11, "cache_read_input_tokens": 200, "cache_creation_input_tokens": 50,
             "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20},
             "output_tokens": 1, "service_tier": "standard"}  # fmt: skip
    s.add(start, final=False)
    assert s.seen and not s.final
    s.add({"output_tokens": 40, "input_tokens": None, "server_tool_use": {"web_search_requests": 2}}, final=True)
    usage, tier = s.result()
    assert s.final and tier == "standard"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (261, 40, 200)  # not 41
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens, usage.web_search_requests) == (30, 20, 2)
    s.add({"input_tokens": 12, "cache_read_input_tokens": 0}, final=True)  # a repeat of the input counts wins
    assert s.result()[0].prompt_tokens == 12 + 0 + 50 and s.result()[0].cached_tokens == 0


def test_the_estimate_reads_system_messages_and_tools_and_the_quota_reserves_max_tokens():
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}
    bigger = {**base, "system": "s" * 400, "tools": [{"name": "t", "description": "d" * 400}]}
    assert prompt_estimate(bigger) - prompt_estimate(base) >= 800 // 4
    assert estimate_usage(bigger, 9) == TokenUsage(prompt_estimate(bigger), 3)
    assert worst_case_tokens(bigger, 1024) == TokenUsage(prompt_estimate(bigger), 300)


def test_output_chars_count_text_thinking_and_tool_input():
    message = {"content": [{"type": "thinking", "thinking": "abcd"}, {"type": "text", "text": "hello"},
                           {"type": "tool_use", "name": "f", "input": {"a": 1}}]}  # fmt: skip
    assert output_chars(message) == 4 + 5 + len(b'{"a":1}')
    assert delta_chars({"type": "input_json_delta", "partial_json": '{"a'}) == 3 and delta_chars(None) == 0


def test_sse_events_are_kept_byte_for_byte_and_typed_from_their_data():
    e = _event([b"event: content_block_delta", b'data: {"type":"content_block_delta","index":0}'])
    assert e is not None and e.type == "content_block_delta"
    assert e.raw == b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0}\n\n'
    assert _event([b": keep-alive"]) is None and _event([b"data: not json"]) is None


def test_a_streamed_message_folds_back_and_replays_as_the_same_stream():
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
               "stop_sequence": None, "usage": FULL,
               "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                           {"type": "text", "text": "Hello world"},
                           {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"q": [1, 2]}}]}  # fmt: skip
    folded = MessageAssembler()
    for raw in replay_events(message):
        e = _event(raw.strip().split(b"\n"))
        assert e is not None
        folded.add(e.type, e.data)
    again = orjson.loads(folded.message_json() or b"null")
    assert again["content"] == message["content"] and again["stop_reason"] == "tool_use"
    assert normalize(again["usage"]) == normalize(FULL)


def test_an_unfinished_stream_is_not_cached():
    a = MessageAssembler()
    a.add("message_start", {"message": {"id": "m", "content": [], "usage": {"input_tokens": 1}}})
    assert a.message_json() is None


def test_one_table_maps_every_status_to_an_anthropic_error_type():
    assert anthropic_type(401) == "authentication_error" and anthropic_type(429) == "rate_limit_error"
    assert anthropic_type(422) == "invalid_request_error" and anthropic_type(502) == "api_error"
    assert anthropic_type(503) == "overloaded_error" and set(ANTHROPIC_TYPES.values()) >= {"not_found_error"}
    err = GatewayError("slow down", headers={"retry-after": "3"})
    err.status = 429
    r = error_response(err, "req_1", "anthropic")
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.headers["x-request-id"] == "req_1"
    assert orjson.loads(r.body) == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"},
                                    "request_id": "req_1"}  # fmt: skip
    assert orjson.loads(error_response(err, "req_1").body)["error"]["code"] == "internal_error"  # OpenAI's stays
