"""The Responses SSE relay on its own: blocks passed through as framed, the provider's id swapped only where
the response object travels, and every way a stream ends (completed, failed, provider error, cut)."""

from __future__ import annotations

import orjson
import pytest

from services.proxy.errors import UpstreamError
from services.proxy.responses_stream import ResponsesOutcome, ResponsesRelay


class Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):
        for c in self.chunks:
            yield c


class Upstream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = Content(chunks)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def ev(kind: str, seq: int, **payload) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, "sequence_number": seq,
                                                                     **payload}) + b"\n\n"  # fmt: skip


RESP = {"id": "resp_up", "status": "in_progress", "usage": None, "output": []}
DONE = {**RESP, "status": "completed", "usage": {"input_tokens": 5, "output_tokens": 2}}


async def relay(chunks: list[bytes], quote=None) -> tuple[list[bytes], ResponsesOutcome]:
    ends: list[ResponsesOutcome] = []
    r = ResponsesRelay(Upstream(chunks), 0.0, lambda up: [(orjson.dumps(up), b'"resp_tw"')], ends.append,
                       quote=quote)  # fmt: skip
    await r.prime()
    out = [b async for b in r.events()]
    r.finish(False)
    r.finish(True)  # once only
    assert len(ends) == 1
    return out, ends[0]


async def test_blocks_pass_through_and_only_response_events_are_renamed():
    created = ev("response.created", 0, response=RESP)
    delta = ev("response.output_text.delta", 1, item_id="resp_up_not_an_id", delta="Hi")
    # split mid-event: framing comes from blank lines, not from chunks
    stream = created + delta + ev("response.completed", 2, response=DONE)
    out, o = await relay([stream[:7], stream[7:60], stream[60:]])
    whole = b"".join(out)
    assert whole.startswith(created.replace(b'"resp_up"', b'"resp_tw"') + delta)
    tail = whole[len(created) + len(delta) + 2 :]
    assert b'"resp_tw"' in tail and b'"resp_up"' not in tail
    assert o.terminal == "response.completed" and o.response["usage"]["input_tokens"] == 5
    assert o.output_chars == 2 and o.ttft_ms is not None and not o.upstream_broken


async def test_failed_and_error_events_end_the_stream_as_the_provider_said():
    _, o = await relay([ev("response.created", 0, response=RESP),
                        ev("response.failed", 1, response={**RESP, "status": "failed"})])  # fmt: skip
    assert o.terminal == "response.failed" and o.completed and not o.upstream_broken
    out, o = await relay([ev("response.created", 0, response=RESP),
                          ev("error", 1, code="server_error", message="boom")])  # fmt: skip
    assert o.provider_error and o.completed and out[-1].startswith(b"event: error")


async def test_a_cut_stream_gets_an_error_event_numbered_after_the_last():
    out, o = await relay([ev("response.created", 0, response=RESP),
                          ev("response.output_text.delta", 1, delta="abc")])  # fmt: skip
    assert o.upstream_broken and o.response is None and o.output_chars == 3
    last = orjson.loads(out[-1].split(b"data: ")[1])
    assert (
        last["type"] == "error" and last["sequence_number"] == 2 and last["error"]["code"] == "upstream_stream_broken"
    )


async def test_a_stream_without_any_event_is_a_retryable_failed_attempt():
    r = ResponsesRelay(Upstream([b": keep-alive\n\n"]), 0.0, lambda up: [], lambda o: None)
    with pytest.raises(UpstreamError) as err:
        await r.prime()
    assert err.value.retryable and r.resp.closed


async def test_events_that_arrive_together_go_out_in_one_write_and_apart_apart():
    created = ev("response.created", 0, response=RESP)
    opening = created + ev("response.in_progress", 1, response=RESP) + ev("response.output_item.added", 2, item={})
    first = ev("response.output_text.delta", 3, delta="Hi")
    done = ev("response.completed", 4, response=DONE)
    out, o = await relay([opening + first, ev("response.output_text.delta", 5, delta=" there"), done])
    assert len(out) == 3 and out[0].count(b"event: ") == 4 and out[0].endswith(first)
    assert out[0].count(b'"resp_tw"') == 2 and b'"resp_up"' not in out[0]  # created and in_progress renamed
    assert o.output_chars == 8 and o.terminal == "response.completed"
    # a whole stream in one read: the first token goes out at once, the rest in one more write
    out, _ = await relay([opening + first + ev("response.output_text.delta", 5, delta=" there") + done])
    assert len(out) == 2 and out[0].endswith(first) and out[1].endswith(b"\n\n") and b"response.completed" in out[1]
    # one event per read: one write each, exactly as before
    out, _ = await relay([created, first, done])
    assert len(out) == 3 and out[1] == first


def quoted(usd: str):
    asked: list[tuple[dict, int]] = []

    def quote(response: dict, chars: int) -> str:
        asked.append((response, chars))
        return usd

    return quote, asked


async def test_the_final_response_carries_usage_cost_as_an_exact_json_number():
    quote, asked = quoted("0.000123456789012345678")
    stream = [ev("response.created", 0, response=RESP), ev("response.output_text.delta", 1, delta="Hi"),
              ev("response.completed", 2, response={**DONE, "usage": {**DONE["usage"], "cost": 99}})]  # fmt: skip
    out, o = await relay(stream, quote)
    last = out[-1]
    assert last.startswith(b"event: response.completed\ndata: ") and last.endswith(b"}\n\n")
    assert b'"cost":0.000123456789012345678}' in last  # the digits as written, not a float's; the provider's replaced
    event = orjson.loads(last.split(b"data: ", 1)[1])
    assert event["response"]["id"] == "resp_tw" and event["sequence_number"] == 2
    assert event["response"]["usage"]["input_tokens"] == 5 and event["response"]["usage"]["output_tokens"] == 2
    assert asked == [(o.response, 2)] and o.response["usage"]["cost"] == 99  # the bill reads the provider's usage


async def test_no_cost_when_unpriced_failed_or_without_usage():
    quote, asked = quoted("")
    completed = ev("response.completed", 1, response=DONE)
    out, _ = await relay([ev("response.created", 0, response=RESP), completed], quote)
    assert out[-1] == completed.replace(b'"resp_up"', b'"resp_tw"') and len(asked) == 1
    quote, asked = quoted("0.5")
    failed = ev("response.failed", 1, response={**DONE, "status": "failed"})
    no_usage = ev("response.completed", 1, response={**DONE, "usage": None})
    for final in (failed, no_usage):
        out, _ = await relay([ev("response.created", 0, response=RESP), final], quote)
        assert b'"cost"' not in out[-1]
    assert asked == []
    quote, asked = quoted("0.5")
    incomplete = ev("response.incomplete", 1, response={**DONE, "status": "incomplete"})
    out, o = await relay([ev("response.created", 0, response=RESP), incomplete], quote)
    assert orjson.loads(out[-1].split(b"data: ", 1)[1])["response"]["usage"]["cost"] == 0.5
    assert o.terminal == "response.incomplete"


async def test_the_openai_sdk_reads_the_costed_final_event():
    from openai.types.responses import ResponseCompletedEvent

    quote, _ = quoted("0.0000105")
    full = {"id": "resp_up", "object": "response", "created_at": 1, "status": "completed", "model": "m",
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": 2,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}}  # fmt: skip
    out, _ = await relay([ev("response.created", 0, response=RESP), ev("response.completed", 1, response=full)], quote)
    event = ResponseCompletedEvent.model_validate_json(out[-1].split(b"data: ", 1)[1])
    assert event.response.usage is not None and event.response.usage.output_tokens == 2
    assert event.response.usage.model_extra == {"cost": 1.05e-05}


async def test_events_without_an_event_line_are_parsed_for_their_type():
    raw = [b"data: " + orjson.dumps({"type": "response.created", "sequence_number": 0, "response": RESP}) + b"\n\n",
           b"data: " + orjson.dumps({"type": "response.output_text.delta", "sequence_number": 1, "delta": "abc"})
           + b"\n\n",
           b"data: " + orjson.dumps({"type": "response.completed", "sequence_number": 2, "response": DONE})
           + b"\n\n"]  # fmt: skip
    out, o = await relay(raw)
    assert o.terminal == "response.completed" and o.output_chars == 3 and b'"resp_tw"' in out[0]


async def test_bounds_still_hold_across_coalesced_reads():
    ends: list[ResponsesOutcome] = []
    big = ev("response.output_text.delta", 1, delta="x" * 300)
    r = ResponsesRelay(Upstream([ev("response.created", 0, response=RESP), big]), 0.0, lambda up: [], ends.append,
                       max_line=200)  # fmt: skip
    await r.prime()
    out = [b async for b in r.events()]
    assert ends[0].too_large and b"upstream_response_too_large" in out[-1]
    assert orjson.loads(out[-1].split(b"data: ")[1])["sequence_number"] == 1
