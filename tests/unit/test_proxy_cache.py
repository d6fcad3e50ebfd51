"""Response cache: what is cacheable, canonical keys, LRU/TTL bounds, stream assembly and replay."""

from __future__ import annotations

import orjson

from services.proxy.cache import CompletionAssembler, Entry, ResponseCache, cache_key, cache_use, replay_chunks
from services.proxy.tokens import TokenUsage

BODY = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_only_deterministic_chat_is_cached_by_default_and_the_header_decides_otherwise():
    assert (u := cache_use(None, BODY, "chat")).read and u.write
    assert not cache_use(None, {**BODY, "temperature": 0.7}, "chat").read
    assert not cache_use(None, {k: v for k, v in BODY.items() if k != "temperature"}, "chat").read
    assert not cache_use(None, {"input": "x"}, "embedding").read
    assert cache_use("true", {**BODY, "temperature": 1}, "chat").read
    assert cache_use("TRUE", {"input": "x"}, "embedding").write
    nc = cache_use("no-cache", BODY, "chat")
    assert not nc.read and nc.write  # skip the lookup, refresh the entry
    assert cache_use("no-store", BODY, "chat") == cache_use("false", BODY, "chat")
    assert not cache_use("no-store", BODY, "chat").write


def test_key_ignores_volatile_fields_and_number_spelling_but_not_content_team_or_model():
    k = cache_key("t1", "gpt-4.1", "chat", BODY)
    same = {**BODY, "temperature": 0.0, "user": "u9", "stream": True, "stream_options": {"include_usage": True},
            "model": "gpt-4.1", "metadata": {"a": "b"}}  # fmt: skip
    assert cache_key("t1", "gpt-4.1", "chat", dict(reversed(list(same.items())))) == k
    assert cache_key("t2", "gpt-4.1", "chat", BODY) != k
    assert cache_key("t1", "gpt-4.1-mini", "chat", BODY) != k
    assert cache_key("t1", "gpt-4.1", "chat", {**BODY, "messages": [{"role": "user", "content": "hi!"}]}) != k
    assert cache_key("t1", "gpt-4.1", "chat", {**BODY, "seed": 1}) != k


def entry(body: bytes, expires: float = 1e18) -> Entry:
    return Entry(body, TokenUsage(1, 1, 0), "provider", "p", expires)


def test_lru_evicts_least_recently_used_and_honours_byte_bounds_and_ttl():
    c = ResponseCache(max_entries=2, max_bytes=100, max_entry_bytes=60)
    c.put(b"a", entry(b"1" * 10))
    c.put(b"b", entry(b"2" * 10))
    assert c.get(b"a")  # a is now the most recent
    c.put(b"c", entry(b"3" * 10))
    assert c.get(b"b") is None and c.get(b"a") and c.get(b"c")
    assert not c.put(b"big", entry(b"x" * 61))  # one entry over its own bound is never stored
    c.put(b"d", entry(b"4" * 55))
    c.put(b"e", entry(b"5" * 55))  # together over 100 bytes: the older goes
    assert c.get(b"d") is None and c.bytes == 55
    c.put(b"old", entry(b"z", expires=5.0))
    assert c.get(b"old", now=4.0) and c.get(b"old", now=5.0) is None


def test_stream_is_assembled_into_the_completion_it_streams_and_replayed_back():
    chunks = [
        {"id": "c1", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": " world"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call1", "type": "function",
                                                                          "function": {"name": "f", "arguments": '{"a"'}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
    ]  # fmt: skip
    a = CompletionAssembler()
    for ch in chunks:
        a.add(ch)
    done = a.completion()
    msg = done["choices"][0]["message"]
    assert msg["content"] == "Hello world" and msg["tool_calls"][0]["function"] == {
        "name": "f",
        "arguments": '{"a": 1}',
    }
    assert done["usage"]["total_tokens"] == 7 and done["object"] == "chat.completion"

    events = replay_chunks(done, include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    replayed = CompletionAssembler()
    for e in events[:-1]:
        replayed.add(orjson.loads(e[6:]))
    assert replayed.completion() == done
    no_usage = [orjson.loads(e[6:]) for e in replay_chunks(done, include_usage=False)[:-1]]
    assert all("usage" not in c and c["choices"] for c in no_usage)


def test_an_unfinished_stream_is_not_an_answer():
    a = CompletionAssembler()
    a.add({"id": "c", "choices": [{"index": 0, "delta": {"content": "half"}}]})
    assert a.completion() is None
