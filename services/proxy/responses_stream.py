"""SSE relay for the Responses API's typed events (`event: <type>` + `data: {...}` blocks): each block is
passed through as the provider framed it, and the outcome (the final response, deltas seen, how it ended) is
kept for the bill. The changes made to the bytes: the provider's response id becomes Tollway's (on the
events that carry the response object; deltas name items, not the response), and the final response's usage
carries `cost`, the call's exact amount, when it is priced.

The sibling of streaming.StreamRelay (chat's data-only chunks): same contract (prime before the first byte
so the call can still be retried; `finish` exactly once; SSEResponse sends it), separate so chat's hot path
is untouched. A stream that ends without response.completed / .incomplete / .failed is broken; the client
gets an `error` event the openai SDK raises as an APIError.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from services.proxy.cost import nested_usage_with_cost
from services.proxy.errors import GatewayError, UpstreamError, UpstreamUnavailable
from services.proxy.streaming import MAX_LINE, MAX_STREAM, StreamTooLarge, line_batches
from services.proxy.upstream import TRANSPORT_ERRORS

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
CARRY_RESPONSE = frozenset({"response.created", "response.in_progress", "response.queued", *TERMINAL})
_OUTPUT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta",
                            "response.function_call_arguments.delta"})  # fmt: skip
_PRICED = frozenset({"response.completed", "response.incomplete"})  # a failed response is not billed as answered
_PARSED = _OUTPUT_DELTAS | TERMINAL  # parsed whatever else: the output count and the bill come from them


@dataclass(slots=True)
class ResponsesOutcome:
    response: dict[str, Any] | None = None  # the final event's response object (its usage is the bill)
    terminal: str = ""  # the final event's type; "" if the stream ended without one
    provider_error: bool = False  # an `error` event from the provider
    upstream_broken: bool = False
    too_large: bool = False
    client_gone: bool = False
    ttft_ms: float | None = None
    output_chars: int = 0

    @property
    def completed(self) -> bool:
        return bool(self.terminal) or self.provider_error


def error_event(code: str, message: str, seq: int) -> bytes:
    """OpenAI's `error` stream event, with an `error` object too: the openai SDK raises APIError on it."""
    payload = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": seq,
               "error": {"type": "api_error", "code": code, "message": message}}  # fmt: skip
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


class ResponsesRelay:
    """One upstream Responses stream relayed to one client. `rename(upstream_id)` gives the replacements to
    make in response-carrying events (the provider's ids -> Tollway's), learned from response.created.
    `quote(response, output_chars)`, when given, is the call's exact amount ('' unpriced): the final
    response's usage carries it as `usage.cost` (OpenRouter's shape; services/proxy/cost.py).

    The events that arrived in one network read go out in one write, except that the first text delta is sent
    as soon as it is relayed: the four or five events that open a stream (created, in_progress,
    output_item.added, content_part.added) usually arrive with it, and a write each costs more than the
    relay's own work on them (bench/README.md, stream TTFT A/B)."""

    def __init__(self, resp: aiohttp.ClientResponse, started: float,
                 rename: Callable[[str], list[tuple[bytes, bytes]]], on_end: Callable[[ResponsesOutcome], None],
                 max_line: int = MAX_LINE, max_stream: int = MAX_STREAM,
                 quote: Callable[[dict[str, Any], int], str] | None = None) -> None:  # fmt: skip
        self.resp = resp
        self.started = started
        self.rename = rename
        self.on_end = on_end
        self.quote = quote
        self.out = ResponsesOutcome()
        self._batches = self._read(line_batches(resp.content, max_line, max_stream))
        self._first: list[list[bytes]] | None = None
        self._swaps: list[tuple[bytes, bytes]] = []
        self._seq = 0  # the next sequence number, from the last event that was parsed
        self._tail = b""  # the last event's data: its sequence number is read only if the gateway must add one
        self._finished = False

    @staticmethod
    async def _read(batches: AsyncIterator[list[bytes]]) -> AsyncIterator[list[list[bytes]]]:
        """The SSE events (each its lines, up to its blank line) complete after each network read."""
        lines: list[bytes] = []
        async for batch in batches:
            blocks = []
            for line in batch:
                if line:
                    lines.append(line)
                elif lines:
                    blocks.append(lines)
                    lines = []
            if blocks:
                yield blocks
        if lines:
            yield [lines]

    async def prime(self) -> None:
        """Read the first event before the client sees a byte: until then the call can still be retried."""
        try:
            async for blocks in self._batches:
                for i, block in enumerate(blocks):
                    if any(line.startswith(b"data:") for line in block):
                        self._first = blocks[i:]
                        return
        except StreamTooLarge as err:
            self.resp.close()
            raise UpstreamError(f"upstream stream too large: {err}", code="upstream_response_too_large") from err
        except TRANSPORT_ERRORS as err:
            self.resp.close()
            failure: GatewayError = UpstreamUnavailable(
                f"upstream stream failed before its first event: {type(err).__name__}"
            )
            failure.retryable = True
            raise failure from err
        self.resp.close()
        failure = UpstreamError("upstream stream ended before its first event")
        failure.retryable = True
        raise failure

    def _relay(self, block: list[bytes]) -> bytes:
        out = self.out
        data = name = None
        for line in block:
            if line.startswith(b"data:"):
                if data is None:
                    data = line[5:].strip()
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("latin-1")
        raw = b"\n".join(block) + b"\n\n"
        if not data:
            return raw
        self._tail = data
        # the `event:` line names the type (OpenAI always sends it): only the events the bill or the id rename
        # needs are parsed; the others (output_item.*, content_part.*, *.done) pass untouched
        event: Any = None
        if name is None or name in _PARSED or (name in CARRY_RESPONSE and not self._swaps):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                if isinstance(event.get("type"), str):
                    name = event["type"]
                if isinstance(event.get("sequence_number"), int):
                    self._seq = event["sequence_number"] + 1
            else:
                event = None
        if name in _OUTPUT_DELTAS:
            delta = event.get("delta") if event is not None else None
            if isinstance(delta, str):
                if out.ttft_ms is None and name == "response.output_text.delta":
                    out.ttft_ms = (time.perf_counter() - self.started) * 1000
                out.output_chars += len(delta)
        elif name in CARRY_RESPONSE:
            response = event.get("response") if event is not None else None
            if isinstance(response, dict):
                if not self._swaps and isinstance(response.get("id"), str):
                    self._swaps = self.rename(response["id"])
                if name in TERMINAL:
                    out.response, out.terminal = response, name
                    if self.quote is not None and name in _PRICED and isinstance(response.get("usage"), dict):
                        usd = self.quote(response, out.output_chars)
                        if usd:
                            raw = b"event: " + name.encode() + b"\ndata: " + nested_usage_with_cost(
                                event, "response", usd) + b"\n\n"  # fmt: skip
            for old, new in self._swaps:
                raw = raw.replace(old, new)
        elif name == "error":
            out.provider_error = True
        return raw

    def _next_seq(self) -> int:
        """The sequence number an event the gateway adds takes: after the last one relayed."""
        try:
            last = orjson.loads(self._tail) if self._tail else None
        except orjson.JSONDecodeError:
            last = None
        seq = last.get("sequence_number") if isinstance(last, dict) else None
        return max(self._seq, seq + 1) if isinstance(seq, int) else self._seq

    async def events(self) -> AsyncIterator[bytes]:
        """The events, as they come. The final one goes out only after the call is recorded (`finish`): a
        client holding a whole answer while the process dies before its event is in the spool would be a call
        answered and never billed (tests/e2e/test_pipeline_kill9.py)."""
        out = self.out
        try:
            blocks = self._first
            self._first = None
            while blocks is not None:
                parts = []
                for block in blocks:
                    waiting = out.ttft_ms is None
                    parts.append(self._relay(block))
                    if out.completed:  # the final event: nothing the client needs comes after it
                        self.finish(False)
                        yield b"".join(parts)
                        return
                    if waiting and out.ttft_ms is not None:  # the first token does not wait for the rest
                        yield b"".join(parts)
                        parts = []
                if parts:
                    yield b"".join(parts)
                blocks = await anext(self._batches, None)
            out.upstream_broken = True
            last = error_event("upstream_stream_broken", "The upstream provider ended the stream early.",
                               self._next_seq())  # fmt: skip
        except TRANSPORT_ERRORS:
            out.upstream_broken = True
            last = error_event("upstream_stream_broken", "The upstream provider's stream broke.", self._next_seq())
        except StreamTooLarge:
            out.upstream_broken = out.too_large = True
            last = error_event("upstream_response_too_large",
                               "The upstream provider's stream exceeded the gateway's bounds.",
                               self._next_seq())  # fmt: skip
        self.finish(False)
        yield last

    def finish(self, client_gone: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.out.client_gone = client_gone and not self.out.completed
        self.on_end(self.out)

    async def aclose(self) -> None:
        self.resp.close()  # close, not release: a stream cut short must stop the provider generating
