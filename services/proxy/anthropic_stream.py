"""SSE pass-through for Anthropic's Messages API: typed events (`event:` + `data:`) relayed unchanged as they
come (the final `message_delta` gains `usage.cost` when the call is priced), usage read from `message_start`
and `message_delta`, and the two conversions the response cache needs
(a streamed message folded back into one, a cached message replayed as a stream).

Ends exactly once however the stream ends, like the chat relay (services/proxy/streaming.py, whose line
reader, bounds and SSEResponse it shares): completed (`message_stop`), the provider's own `error` event,
the upstream cut short, the client gone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from services.proxy.anthropic_usage import StreamUsage
from services.proxy.cost import usage_with_cost
from services.proxy.errors import GatewayError, UpstreamError, UpstreamUnavailable, anthropic_error_body
from services.proxy.streaming import MAX_LINE, MAX_STREAM, StreamOutcome, StreamTooLarge, line_batches
from services.proxy.tokens import TokenUsage
from services.proxy.upstream import TRANSPORT_ERRORS

# the provider's error types worth another attempt when they come before the client saw a byte
RETRYABLE_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})


class Event:
    """One SSE event: its bytes as the provider sent them (re-joined with LF), its type and parsed data."""

    __slots__ = ("data", "raw", "type")

    def __init__(self, raw: bytes, type_: str, data: Any) -> None:
        self.raw = raw
        self.type = type_
        self.data = data


def _event(lines: list[bytes]) -> Event | None:
    name = ""
    data: list[bytes] = []
    for line in lines:
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("latin-1")
    if not data:
        return None  # a comment or keep-alive: nothing the client can use
    try:
        parsed = orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    kind = parsed.get("type") if isinstance(parsed.get("type"), str) else name
    return Event(b"\n".join(lines) + b"\n\n", kind, parsed)


def error_event(message: str, status: int = 502) -> bytes:
    """An `error` event in Anthropic's shape: the SDKs raise it as an API error mid-stream."""
    return b"event: error\ndata: " + anthropic_error_body(message, status) + b"\n\n"


class MessagesRelay:
    """One upstream Messages stream relayed to one client; `finish` runs exactly once however it ends."""

    def __init__(self, resp: aiohttp.ClientResponse, started: float, on_end: Callable[[MessagesRelay], None],
                 assembler: MessageAssembler | None = None, max_line: int = MAX_LINE,
                 max_stream: int = MAX_STREAM, quote: Callable[[TokenUsage, str], str] | None = None) -> None:  # fmt: skip
        self.resp = resp
        # the whole call's amount ('' unpriced) for the final message_delta's usage.cost (services/proxy/cost.py)
        self.quote = quote
        self.started = started
        self.on_end = on_end
        self.assembler = assembler
        self.out = StreamOutcome()
        self.usage = StreamUsage()
        self.error_type: str | None = None  # the provider's own `error` event, mid-stream
        self._batches = self._read(line_batches(resp.content, max_line, max_stream))
        self._first: list[Event] | None = None
        self._finished = False

    @staticmethod
    async def _read(batches: AsyncIterator[list[bytes]]) -> AsyncIterator[list[Event]]:
        """The events complete after each network read: those that arrived together go out in one write
        (message_start, content_block_start and the first delta usually do), the first delta at once."""
        lines: list[bytes] = []
        async for batch in batches:
            events = []
            for line in batch:
                if line:
                    lines.append(line)
                    continue
                event = _event(lines) if lines else None
                lines = []
                if event is not None:
                    events.append(event)
            if events:
                yield events
        if lines:  # the last event, unterminated: the stream was cut inside it
            event = _event(lines)
            if event is not None:
                yield [event]

    async def prime(self) -> None:
        """Read the first event before the client sees a byte: until then the call can still be retried
        elsewhere. An upstream that breaks, ends or answers `error` here is a failed attempt."""
        failure: GatewayError
        try:
            async for events in self._batches:
                event = events[0]
                if event.type == "error":
                    self.resp.close()
                    err = event.data.get("error") if isinstance(event.data.get("error"), dict) else {}
                    kind = str(err.get("type", ""))
                    failure = UpstreamUnavailable(
                        f"The provider failed the stream before its first event ({kind[:60]})."
                    )
                    failure.retryable = kind in RETRYABLE_TYPES
                    raise failure
                self._first = events
                return
        except StreamTooLarge as err:
            self.resp.close()
            raise UpstreamError(f"upstream stream too large: {err}", code="upstream_response_too_large") from err
        except TRANSPORT_ERRORS as err:
            self.resp.close()
            failure = UpstreamUnavailable(f"upstream stream failed before its first event: {type(err).__name__}")
            failure.retryable = True
            raise failure from err
        self.resp.close()
        failure = UpstreamError("upstream stream ended before its first event")
        failure.retryable = True
        raise failure

    def _note(self, event: Event) -> None:
        out, data = self.out, event.data
        if self.assembler is not None:
            self.assembler.add(event.type, data)
        if event.type == "content_block_delta":
            if out.ttft_ms is None:
                out.ttft_ms = (time.perf_counter() - self.started) * 1000
            out.content_chars += delta_chars(data.get("delta"))
        elif event.type == "message_start":
            message = data.get("message")
            self.usage.add(message.get("usage") if isinstance(message, dict) else None, final=False)
        elif event.type == "message_delta":
            self.usage.add(data.get("usage"), final=True)

    async def events(self) -> AsyncIterator[bytes]:
        """The events, as they come. The last one goes out only after the call is recorded (`finish`): the
        client holding a whole answer while the process dies before its event is written would be a call
        answered and never billed (tests/e2e/test_pipeline_kill9.py found that window)."""
        out = self.out
        try:
            batch = self._first
            self._first = None
            while batch is not None:
                parts = []
                for event in batch:
                    waiting = out.ttft_ms is None
                    self._note(event)
                    if event.type == "message_stop":
                        out.completed = True
                        self.finish(False)
                        parts.append(event.raw)
                        yield b"".join(parts)
                        return
                    if event.type == "error":  # the provider ended the stream with its own error: relayed as is
                        err = event.data.get("error")
                        self.error_type = (
                            str(err.get("type", "api_error"))[:60] if isinstance(err, dict) else "api_error"
                        )
                        out.upstream_broken = True
                        self.finish(False)
                        parts.append(event.raw)
                        yield b"".join(parts)
                        return
                    if event.type == "message_delta" and isinstance(event.data.get("usage"), dict):
                        parts.append(self._costed(event))
                    else:
                        parts.append(event.raw)
                    if waiting and out.ttft_ms is not None:  # the first token does not wait for the rest
                        yield b"".join(parts)
                        parts = []
                if parts:
                    yield b"".join(parts)
                batch = await anext(self._batches, None)
            last = error_event("The upstream provider ended the stream early.")
        except TRANSPORT_ERRORS:
            last = error_event("The upstream provider's stream broke.")
        except StreamTooLarge:
            out.too_large = True
            last = error_event("The upstream provider's stream exceeded the gateway's bounds.")
        out.upstream_broken = True
        self.finish(False)
        yield last

    def _costed(self, event: Event) -> bytes:
        """message_delta with `usage.cost`: the whole call priced (message_start's input and cache counts, this
        event's cumulative output), as on_end bills it; as the provider sent it when unpriced."""
        usd = self.quote(*self.usage.result()) if self.quote is not None else ""
        if not usd:
            return event.raw
        return b"event: message_delta\ndata: " + usage_with_cost(event.data, event.data["usage"], usd) + b"\n\n"

    def finish(self, client_gone: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.out.client_gone = client_gone and not self.out.completed
        self.on_end(self)

    async def aclose(self) -> None:
        # close, not release: a stream cut short must drop the connection so the provider stops generating
        self.resp.close()


def delta_chars(delta: Any) -> int:
    """Characters of output one content_block_delta carries (text, thinking, tool input JSON)."""
    if not isinstance(delta, dict):
        return 0
    for field in ("text", "thinking", "partial_json"):
        v = delta.get(field)
        if isinstance(v, str):
            return len(v)
    return 0


class MessageAssembler:
    """Folds a Messages stream back into the message a plain call returns (for the response cache)."""

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json_parts: dict[int, list[str]] = {}
        self.usage: dict[str, Any] = {}
        self.stopped = False

    def add(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "message_start" and isinstance(data.get("message"), dict):
            self.message = dict(data["message"])
            if isinstance(self.message.get("usage"), dict):
                self.usage.update({k: v for k, v in self.message["usage"].items() if v is not None})
            return
        index = data.get("index")
        if kind == "content_block_start" and isinstance(index, int) and isinstance(data.get("content_block"), dict):
            self.blocks[index] = dict(data["content_block"])
        elif kind == "content_block_delta" and index in self.blocks and isinstance(data.get("delta"), dict):
            block, delta = self.blocks[index], data["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = str(block.get("text", "")) + str(delta.get("text", ""))
            elif dtype == "thinking_delta":
                block["thinking"] = str(block.get("thinking", "")) + str(delta.get("thinking", ""))
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif dtype == "input_json_delta":
                self.json_parts.setdefault(index, []).append(str(delta.get("partial_json", "")))
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "content_block_stop" and index in self.json_parts:
            try:
                self.blocks[index]["input"] = orjson.loads("".join(self.json_parts.pop(index)) or "{}")
            except orjson.JSONDecodeError:
                self.blocks[index]["input"] = {}
        elif kind == "message_delta" and self.message is not None:
            if isinstance(data.get("delta"), dict):
                self.message.update(data["delta"])
            if isinstance(data.get("usage"), dict):
                self.usage.update({k: v for k, v in data["usage"].items() if v is not None})
        elif kind == "message_stop":
            self.stopped = True

    def message_json(self) -> bytes | None:
        if self.message is None or not self.stopped:
            return None
        content = [self.blocks[i] for i in sorted(self.blocks)]
        return orjson.dumps({**self.message, "content": content, "usage": self.usage})


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


def replay_events(message: dict[str, Any]) -> list[bytes]:
    """A cached message as the stream a Messages call would have sent: one delta per block."""
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events = [_sse("message_start", {"message": start})]
    for i, block in enumerate(message.get("content") or ()):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            opening, deltas = {**block, "text": ""}, [{"type": "text_delta", "text": block.get("text", "")}]
        elif kind == "thinking":
            opening = {**block, "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                      {"type": "signature_delta", "signature": block.get("signature", "")}]  # fmt: skip
        elif kind == "tool_use":
            opening = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input", {})).decode()}]
        else:
            opening, deltas = block, []
        events.append(_sse("content_block_start", {"index": i, "content_block": opening}))
        events += [_sse("content_block_delta", {"index": i, "delta": d}) for d in deltas]
        events.append(_sse("content_block_stop", {"index": i}))
    delta = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    events.append(_sse("message_delta", {"delta": delta, "usage": usage}))
    events.append(_sse("message_stop", {}))
    return events
