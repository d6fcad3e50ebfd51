"""SSE relay for the Responses API's typed events (`event: <type>` + `data: {...}` blocks): each block is
passed through as the provider framed it, and the outcome (the final response, deltas seen, how it ended) is
kept for the bill. The one change made to the bytes: the provider's response id becomes Tollway's (on the
events that carry the response object; deltas name items, not the response).

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

from services.proxy.errors import GatewayError, UpstreamError, UpstreamUnavailable
from services.proxy.streaming import MAX_LINE, MAX_STREAM, StreamTooLarge, _lines
from services.proxy.upstream import TRANSPORT_ERRORS

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
CARRY_RESPONSE = frozenset({"response.created", "response.in_progress", "response.queued", *TERMINAL})
_OUTPUT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta",
                            "response.function_call_arguments.delta"})  # fmt: skip


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
    make in response-carrying events (the provider's ids -> Tollway's), learned from response.created."""

    def __init__(self, resp: aiohttp.ClientResponse, started: float,
                 rename: Callable[[str], list[tuple[bytes, bytes]]], on_end: Callable[[ResponsesOutcome], None],
                 max_line: int = MAX_LINE, max_stream: int = MAX_STREAM) -> None:  # fmt: skip
        self.resp = resp
        self.started = started
        self.rename = rename
        self.on_end = on_end
        self.out = ResponsesOutcome()
        self._lines = _lines(resp.content, max_line, max_stream)
        self._first: list[bytes] | None = None
        self._swaps: list[tuple[bytes, bytes]] = []
        self._seq = 0
        self._finished = False

    async def _block(self) -> list[bytes] | None:
        """The lines of the next SSE event (up to its blank line), or None at the end of the stream."""
        lines: list[bytes] = []
        async for line in self._lines:
            if line:
                lines.append(line)
            elif lines:
                return lines
        return lines or None

    async def prime(self) -> None:
        """Read the first event before the client sees a byte: until then the call can still be retried."""
        try:
            while True:
                block = await self._block()
                if block is None:
                    break
                if any(line.startswith(b"data:") for line in block):
                    self._first = block
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
        data = next((line[5:].strip() for line in block if line.startswith(b"data:")), None)
        event: Any = None
        if data:
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                event = None
        kind = event.get("type") if isinstance(event, dict) else None
        if isinstance(event, dict) and isinstance(event.get("sequence_number"), int):
            self._seq = event["sequence_number"] + 1
        raw = b"\n".join(block) + b"\n\n"
        if kind in _OUTPUT_DELTAS:
            delta = event.get("delta")
            if isinstance(delta, str):
                if out.ttft_ms is None and kind == "response.output_text.delta":
                    out.ttft_ms = (time.perf_counter() - self.started) * 1000
                out.output_chars += len(delta)
        elif kind in CARRY_RESPONSE:
            response = event.get("response")
            if isinstance(response, dict):
                if not self._swaps and isinstance(response.get("id"), str):
                    self._swaps = self.rename(response["id"])
                if kind in TERMINAL:
                    out.response, out.terminal = response, kind
            for old, new in self._swaps:
                raw = raw.replace(old, new)
        elif kind == "error":
            out.provider_error = True
        return raw

    async def events(self) -> AsyncIterator[bytes]:
        """The events, as they come. The final one goes out only after the call is recorded (`finish`): a
        client holding a whole answer while the process dies before its event is in the spool would be a call
        answered and never billed (tests/e2e/test_pipeline_kill9.py)."""
        out = self.out
        try:
            block = self._first
            self._first = None
            while block is not None:
                raw = self._relay(block)
                if out.completed:  # the final event: nothing the client needs comes after it
                    self.finish(False)
                    yield raw
                    return
                yield raw
                block = await self._block()
            out.upstream_broken = True
            last = error_event("upstream_stream_broken", "The upstream provider ended the stream early.", self._seq)
        except TRANSPORT_ERRORS:
            out.upstream_broken = True
            last = error_event("upstream_stream_broken", "The upstream provider's stream broke.", self._seq)
        except StreamTooLarge:
            out.upstream_broken = out.too_large = True
            last = error_event("upstream_response_too_large",
                               "The upstream provider's stream exceeded the gateway's bounds.", self._seq)  # fmt: skip
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
