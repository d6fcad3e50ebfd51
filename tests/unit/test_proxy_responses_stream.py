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


async def relay(chunks: list[bytes]) -> tuple[list[bytes], ResponsesOutcome]:
    ends: list[ResponsesOutcome] = []
    r = ResponsesRelay(Upstream(chunks), 0.0, lambda up: [(orjson.dumps(up), b'"resp_tw"')], ends.append)
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
    assert out[0] == created.replace(b'"resp_up"', b'"resp_tw"') and out[1] == delta
    assert b'"resp_tw"' in out[2] and b'"resp_up"' not in out[2]
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
