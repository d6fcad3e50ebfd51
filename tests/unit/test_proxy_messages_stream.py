"""The Messages SSE relay on its own: events that arrive in one read go out in one write, the final
message_delta carries the whole call's `usage.cost` (exact text) when priced, and the anthropic SDK reads it."""

from __future__ import annotations

from decimal import Decimal

import orjson

from services.proxy.anthropic_stream import MessagesRelay
from services.proxy.tokens import TokenUsage
from tests.unit.test_proxy_responses_stream import Upstream


def ev(kind: str, **payload) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


START = ev("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                     "content": [], "stop_reason": None, "stop_sequence": None,
                                     "usage": {"input_tokens": 50, "cache_read_input_tokens": 20,
                                               "cache_creation_input_tokens": 10, "output_tokens": 1,
                                               "cache_creation": {"ephemeral_5m_input_tokens": 6,
                                                                  "ephemeral_1h_input_tokens": 4}}})  # fmt: skip
OPEN = ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
DELTA = ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi there"})
STOP_BLOCK = ev("content_block_stop", index=0)
FINAL = ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
           usage={"output_tokens": 7, "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}})  # fmt: skip
STOP = ev("message_stop")


async def relay(chunks: list[bytes], usd: str | None):
    asked: list[tuple[TokenUsage, str]] = []

    def quote(usage: TokenUsage, tier: str) -> str:
        asked.append((usage, tier))
        return usd or ""

    ends: list[MessagesRelay] = []
    r = MessagesRelay(Upstream(chunks), 0.0, ends.append, quote=quote if usd is not None else None)
    await r.prime()
    out = [b async for b in r.events()]
    assert len(ends) == 1 and ends[0].out.completed
    return out, asked


async def test_events_read_together_go_out_together_and_the_final_delta_is_priced_whole():
    out, asked = await relay([START + OPEN + DELTA, STOP_BLOCK + FINAL, STOP], "0.000270000000000000001")
    assert out[0] == START + OPEN + DELTA  # one write to the first token, untouched
    (priced,) = asked
    usage = priced[0]
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (
        80, 20, 6, 4)  # fmt: skip
    assert usage.completion_tokens == 7 and usage.web_search_requests == 1  # message_delta's cumulative output
    assert out[1].startswith(STOP_BLOCK + b"event: message_delta\ndata: ")
    data = out[1][len(STOP_BLOCK) :].split(b"data: ", 1)[1]
    assert data.endswith(b'"cost":0.000270000000000000001}}\n\n')
    parsed = orjson.loads(data)
    assert parsed["usage"]["output_tokens"] == 7 and parsed["delta"]["stop_reason"] == "end_turn"
    assert out[2] == STOP


async def test_unpriced_or_without_a_quote_the_delta_passes_as_sent():
    for usd in ("", None):
        out, _ = await relay([START, OPEN, DELTA, STOP_BLOCK, FINAL, STOP], usd)
        assert out == [START, OPEN, DELTA, STOP_BLOCK, FINAL, STOP]


async def test_the_anthropic_sdk_reads_the_costed_delta():
    from anthropic.types import RawMessageDeltaEvent

    out, _ = await relay([START + OPEN + DELTA + STOP_BLOCK + FINAL + STOP], "0.0001045")
    assert out[0] == START + OPEN + DELTA  # the first token is not held for the rest of the read
    (block,) = [b for b in out[1].split(b"\n\n") if b.startswith(b"event: message_delta")]
    event = RawMessageDeltaEvent.model_validate_json(block.split(b"data: ", 1)[1])
    assert event.usage.output_tokens == 7 and Decimal(str(event.usage.model_extra["cost"])) == Decimal("0.0001045")
